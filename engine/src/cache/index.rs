//! The lock-free block index shared by all reactors.
//!
//! Maps a [`BlockKey`] (backing index + LBA) to the newest cache slot holding
//! that block. All memory is allocated up front, 14 bytes per slot:
//!
//! ```text
//! buckets:   [AtomicU32; nr_slots/2] head of a chain, slot+1 (0 = empty)   2 B
//! key_words: [AtomicU64; nr_slots]   key (56 bits) | flags (8 bits)        8 B
//! next:      [AtomicU32; nr_slots]   next slot in the chain, slot+1        4 B
//! segments:  [SegmentMeta; nr_segments]  seq, gen, state, live, dirty      24 B / segment
//! ```
//!
//! The version of a slot is `(seq of its segment, index in the segment)`.
//! Lookups walk a chain and take the greatest version among nodes with the
//! key; installs walk from the head they read and publish with a CAS on that
//! same head, so "check the newest version, then publish" is atomic with
//! respect to every other install into the bucket. Only the single
//! [`Reclaimer`] removes nodes, and a slot is reused only after QSBR grace
//! periods. The rules and why they are sound are in
//! `docs/index-concurrency.md`.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::mem::size_of;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::ondisk::{record_flags, BlockRecordOnDisk, LBA_LIMIT};

use Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};

// ---------------------------------------------------------------------------
// Newtypes
// ---------------------------------------------------------------------------

/// Index of a log segment on the cache device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId(pub u32);

/// A data block position in the log: `segment * slots_per_segment + index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub u32);

/// Block address in cache-block units on a backing device's data area (48 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lba(pub u64);

/// Index of a backing device in the cache set (0..16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackingIdx(pub u8);

/// Log sequence number of a segment; monotonically increasing across the
/// cache set. 0 means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Seq(pub u64);

/// (backing_idx, lba) packed as `lba | idx << 48` (56 bits used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(u64);

impl BlockKey {
    /// `None` if `lba` does not fit in 48 bits.
    pub fn new(idx: BackingIdx, lba: Lba) -> Option<Self> {
        (lba.0 < LBA_LIMIT).then_some(Self(lba.0 | u64::from(idx.0) << 48))
    }
    /// The key a log record describes.
    pub fn from_record(r: &BlockRecordOnDisk) -> Self {
        // A record's lba is 48 bits by construction.
        Self(r.lba().0 | u64::from(r.backing_idx) << 48)
    }
    pub fn backing(self) -> BackingIdx {
        BackingIdx((self.0 >> 48) as u8)
    }
    pub fn lba(self) -> Lba {
        Lba(self.0 & (LBA_LIMIT - 1))
    }
    pub fn raw(self) -> u64 {
        self.0
    }
}

/// Version of a cached block: later segment seq wins; within a segment the
/// later index wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    pub seq: Seq,
    pub index: u32,
}

/// What an installed entry says about the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Data in the slot, newer than the backing device.
    Dirty,
    /// Data in the slot, same as the backing device.
    Clean,
    /// Reads as zeroes; `dirty` when the backing device still has to be zeroed.
    Zero { dirty: bool },
    /// Any older copy is invalid; the backing device is authoritative.
    Tombstone,
}

impl EntryKind {
    /// From a validated log record's flags.
    pub fn from_record_flags(f: u8) -> Option<Self> {
        use record_flags::*;
        Some(match (f & (DIRTY | CLEAN | TOMBSTONE), f & ZERO != 0) {
            (DIRTY, false) => Self::Dirty,
            (CLEAN, false) => Self::Clean,
            (DIRTY, true) => Self::Zero { dirty: true },
            (CLEAN, true) => Self::Zero { dirty: false },
            (TOMBSTONE, false) => Self::Tombstone,
            _ => return None,
        })
    }
    fn bits(self) -> u64 {
        match self {
            Self::Dirty => F_DIRTY,
            Self::Clean => 0,
            Self::Zero { dirty: true } => F_ZERO | F_DIRTY,
            Self::Zero { dirty: false } => F_ZERO,
            Self::Tombstone => F_TOMBSTONE,
        }
    }
}

// key_word layout: bits 0..56 key, 56..64 flags.
const KEY_MASK: u64 = (1 << 56) - 1;
/// Slot holds an installed entry.
const F_VALID: u64 = 1 << 56;
/// Slot is in its bucket chain (set by install, cleared by the reclaimer).
const F_LINKED: u64 = 1 << 57;
/// Newest version of its key (cleared when superseded or unlinked).
const F_LIVE: u64 = 1 << 58;
const F_DIRTY: u64 = 1 << 59;
const F_TOMBSTONE: u64 = 1 << 60;
const F_ZERO: u64 = 1 << 61;
/// Hit by a foreground read since it was installed: second chance at reclaim (the block is
/// copied forward instead of evicted). A hint: set with a plain `fetch_or` only while the
/// setter is inside the read-side section of the lookup that found the slot, never
/// cleared on a live slot (the copy forward is a fresh slot without it); see
/// docs/index-concurrency.md, "The referenced bit".
const F_REFERENCED: u64 = 1 << 62;

// ---------------------------------------------------------------------------
// QSBR
// ---------------------------------------------------------------------------

/// A grace period did not complete in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraceTimeout {
    /// Participants that had not passed a quiescent state.
    pub stuck: usize,
    pub waited: Duration,
}

impl fmt::Display for GraceTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "grace period timed out after {:?} ({} participants stuck)", self.waited, self.stuck)
    }
}

impl std::error::Error for GraceTimeout {}

#[derive(Debug)]
struct ParticipantState {
    /// 0 = offline; otherwise the global epoch seen at the last quiescent state.
    local: AtomicU64,
}

/// Quiescent-state-based reclamation domain.
#[derive(Debug)]
pub struct Qsbr {
    epoch: AtomicU64,
    completed: AtomicU64,
    participants: Mutex<Vec<Arc<ParticipantState>>>,
}

impl Default for Qsbr {
    fn default() -> Self {
        Self { epoch: AtomicU64::new(1), completed: AtomicU64::new(0), participants: Mutex::new(Vec::new()) }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data inconsistent
    // (push/retain/clone of a Vec, or nothing), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Qsbr {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers the calling thread as a reader; it starts online.
    pub fn register(self: &Arc<Self>) -> Participant {
        let st = Arc::new(ParticipantState { local: AtomicU64::new(0) });
        lock(&self.participants).push(st.clone());
        let mut p = Participant { st, qsbr: self.clone(), _not_sync: PhantomData };
        p.online();
        p
    }

    /// Current global epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// Highest grace-period target known to have completed.
    pub fn completed(&self) -> u64 {
        self.completed.load(SeqCst)
    }

    /// Whether a grace period has elapsed since `epoch()` returned `e`.
    pub fn elapsed_since(&self, e: u64) -> bool {
        self.completed() > e
    }

    /// Waits until every participant online now has passed a quiescent state
    /// (or gone offline). Spins briefly, then yields, then sleeps; gives up
    /// with an error after `timeout` instead of hanging. Must not be called
    /// by a thread whose own participant is online.
    pub fn synchronize(&self, timeout: Duration) -> Result<(), GraceTimeout> {
        let target = self.epoch.fetch_add(1, SeqCst) + 1;
        let parts: Vec<Arc<ParticipantState>> = lock(&self.participants).clone();
        let start = Instant::now();
        let mut spins = 0u32;
        for (i, p) in parts.iter().enumerate() {
            loop {
                let l = p.local.load(SeqCst);
                if l == 0 || l >= target {
                    break;
                }
                let waited = start.elapsed();
                if waited > timeout {
                    let stuck = parts[i..]
                        .iter()
                        .filter(|p| {
                            let l = p.local.load(SeqCst);
                            l != 0 && l < target
                        })
                        .count();
                    return Err(GraceTimeout { stuck, waited });
                }
                spins += 1;
                if spins < 128 {
                    std::hint::spin_loop();
                } else if spins < 256 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        self.completed.fetch_max(target, SeqCst);
        Ok(())
    }
}

/// A registered reader thread. `Send` but not `Sync`: one per thread.
/// Everything an index operation reads is protected from reuse until the
/// participant's next [`Participant::quiescent`] (or `offline`), which takes
/// `&mut self` so no borrow of the participant can be held across it.
#[derive(Debug)]
pub struct Participant {
    st: Arc<ParticipantState>,
    qsbr: Arc<Qsbr>,
    _not_sync: PhantomData<Cell<()>>,
}

impl Participant {
    /// Announces that this thread holds no references into the index.
    /// Reactors call it once per poll-loop iteration.
    pub fn quiescent(&mut self) {
        let e = self.qsbr.epoch.load(SeqCst);
        debug_assert!(self.is_online(), "quiescent() while offline");
        // Announcing the same epoch again changes nothing: skip the (fenced) store. The
        // reactor calls this every poll-loop iteration; the epoch moves once per grace
        // period.
        if self.st.local.load(Relaxed) != e {
            self.st.local.store(e, SeqCst);
        }
    }

    /// Marks the thread idle (e.g. before sleeping): grace periods stop
    /// waiting for it. It must hold no references into the index.
    pub fn offline(&mut self) {
        self.st.local.store(0, SeqCst);
    }

    /// Back from `offline`. Re-reads the epoch until stable so that any grace
    /// period that missed us is visible to our next reads.
    pub fn online(&mut self) {
        loop {
            let e = self.qsbr.epoch.load(SeqCst);
            self.st.local.store(e, SeqCst);
            fence(SeqCst);
            if self.qsbr.epoch.load(SeqCst) == e {
                break;
            }
        }
    }

    pub fn is_online(&self) -> bool {
        self.st.local.load(Relaxed) != 0
    }

    fn belongs_to(&self, q: &Arc<Qsbr>) -> bool {
        Arc::ptr_eq(&self.qsbr, q)
    }
}

impl Drop for Participant {
    fn drop(&mut self) {
        self.st.local.store(0, SeqCst);
        let me = &self.st;
        lock(&self.qsbr.participants).retain(|p| !Arc::ptr_eq(p, me));
    }
}

// ---------------------------------------------------------------------------
// Segments and tokens
// ---------------------------------------------------------------------------

/// Lifecycle of a segment in the index.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentState {
    /// Never handed out since the index was built (recovery may claim it).
    Unused = 0,
    /// A [`FreeSegment`] token exists.
    Free = 1,
    /// Being filled; installs allowed.
    Open = 2,
    /// Immutable; readable; may be reclaimed once clean.
    Sealed = 3,
    /// Reclaim begun: gen bumped, lookups miss it, waiting for grace period 1.
    Reclaiming = 4,
    /// Removed from all chains, waiting for grace period 2 before reuse.
    Unlinked = 5,
}

impl SegmentState {
    fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Free,
            2 => Self::Open,
            3 => Self::Sealed,
            4 => Self::Reclaiming,
            5 => Self::Unlinked,
            _ => Self::Unused,
        }
    }
}

#[derive(Debug, Default)]
struct SegmentMeta {
    seq: AtomicU64,
    gen: AtomicU32,
    state: AtomicU32,
    live: AtomicU32,
    dirty: AtomicU32,
}

/// Snapshot of a segment's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub state: SegmentState,
    pub seq: Seq,
    pub gen: u32,
    /// Entries that are the newest version of their key.
    pub live: u32,
    /// Live entries not yet written back.
    pub dirty: u32,
}

/// Permission to open a segment (from `take_unused` or a finished reclaim).
#[derive(Debug)]
pub struct FreeSegment {
    index_id: u64,
    seg: SegmentId,
}

impl FreeSegment {
    pub fn id(&self) -> SegmentId {
        self.seg
    }
}

/// An open segment; installs into its slots need a reference to it. Consumed
/// by [`BlockIndex::seal`].
#[derive(Debug)]
pub struct OpenSegment {
    index_id: u64,
    seg: SegmentId,
    seq: Seq,
}

impl OpenSegment {
    pub fn id(&self) -> SegmentId {
        self.seg
    }
    pub fn seq(&self) -> Seq {
        self.seq
    }
}

/// The only capability that removes entries. Exactly one per index; not
/// `Clone`; every removal takes `&mut Reclaimer`.
#[derive(Debug)]
pub struct Reclaimer {
    index_id: u64,
}

/// Reclaim begun; unlink after a grace period.
#[derive(Debug)]
pub struct ReclaimStarted {
    seg: SegmentId,
    epoch: u64,
}

/// Unlinked; reusable after another grace period.
#[derive(Debug)]
pub struct UnlinkedSegment {
    seg: SegmentId,
    epoch: u64,
}

impl ReclaimStarted {
    pub fn id(&self) -> SegmentId {
        self.seg
    }
}

impl UnlinkedSegment {
    pub fn id(&self) -> SegmentId {
        self.seg
    }
}

// ---------------------------------------------------------------------------
// Results and errors
// ---------------------------------------------------------------------------

/// A lookup hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub slot: SlotId,
    pub segment: SegmentId,
    pub version: Version,
    /// Segment generation when looked up; see [`BlockIndex::still_valid`].
    pub gen: u32,
    pub dirty: bool,
    /// Reads as zeroes; the slot holds no data.
    pub zero: bool,
}

/// Snapshot taken before reading a block from the backing device for
/// promotion; see [`BlockIndex::install_promotion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromotionTicket {
    key: BlockKey,
    observed: Option<Version>,
    reclaim_epoch: u64,
}

/// A successful install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    pub version: Version,
    /// The version it superseded, if any.
    pub superseded: Option<Version>,
}

/// A live dirty entry to write back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtySlot {
    pub slot: SlotId,
    pub key: BlockKey,
    pub version: Version,
    pub gen: u32,
    pub zero: bool,
}

/// A live clean block that was hit since it was installed: a candidate to copy forward
/// when its segment is reclaimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Referenced {
    pub slot: SlotId,
    pub key: BlockKey,
    pub version: Version,
    /// Segment generation when listed; see [`BlockIndex::copy_forward_ticket`].
    pub gen: u32,
}

/// Why an install did not publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallError {
    /// A newer version of the key is installed; nothing was published.
    Newer { current: Version },
    /// (promotion) the key changed since the ticket was taken.
    Changed,
    /// Index in segment out of range.
    BadIndex { index: u32 },
    /// The slot already holds an entry.
    SlotInUse { slot: SlotId },
    /// A token from another index.
    ForeignToken,
}

/// Index construction and segment-lifecycle errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexError {
    BadGeometry {
        nr_segments: u32,
        slots_per_segment: u32,
    },
    ForeignToken,
    WrongState {
        seg: SegmentId,
        state: SegmentState,
    },
    BadSegment {
        seg: SegmentId,
    },
    BadSeq {
        seq: Seq,
    },
    /// The segment still holds live dirty entries.
    Dirty {
        seg: SegmentId,
        dirty: u32,
    },
    /// The segment's seq is above the persisted writeback seq; reusing it
    /// could resurrect older versions after a crash.
    NotWrittenBack {
        seg: SegmentId,
        seq: Seq,
        writeback_seq: Seq,
    },
    Grace(GraceTimeout),
}

impl fmt::Display for InstallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "install failed: {self:?}")
    }
}
impl std::error::Error for InstallError {}
impl fmt::Display for IndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "index: {self:?}")
    }
}
impl std::error::Error for IndexError {}

/// RAM used by the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    pub slots: u64,
    /// buckets + key_words + next.
    pub per_slot_bytes: u64,
    /// Segment table.
    pub per_segment_bytes: u64,
}

// ---------------------------------------------------------------------------
// The index
// ---------------------------------------------------------------------------

static NEXT_INDEX_ID: AtomicU64 = AtomicU64::new(1);

enum Cond {
    NotOlder,
    Unchanged(PromotionTicket),
}

/// The block index. Share it with `Arc`.
#[derive(Debug)]
pub struct BlockIndex {
    id: u64,
    nr_segments: u32,
    slots_per_segment: u32,
    nr_slots: u32,
    /// Bucket heads: one per two slots (load factor 2) keeps the index at 14 B per slot.
    nr_buckets: u32,
    buckets: Box<[AtomicU32]>,
    key_words: Box<[AtomicU64]>,
    next: Box<[AtomicU32]>,
    segments: Box<[SegmentMeta]>,
    next_seq: AtomicU64,
    reclaim_epoch: AtomicU64,
    reclaimer_taken: AtomicBool,
    seq_lock: Mutex<()>,
    qsbr: Arc<Qsbr>,
}

fn atomics32(n: usize) -> Box<[AtomicU32]> {
    (0..n).map(|_| AtomicU32::new(0)).collect()
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl BlockIndex {
    /// An empty index for `nr_segments * slots_per_segment` slots (which must
    /// fit in `u32::MAX - 1`). All segments start `Unused`.
    pub fn new(nr_segments: u32, slots_per_segment: u32) -> Result<Self, IndexError> {
        let total = u64::from(nr_segments) * u64::from(slots_per_segment);
        if nr_segments == 0 || slots_per_segment == 0 || total >= u64::from(u32::MAX) {
            return Err(IndexError::BadGeometry { nr_segments, slots_per_segment });
        }
        let n = total as usize;
        Ok(Self {
            id: NEXT_INDEX_ID.fetch_add(1, Relaxed),
            nr_segments,
            slots_per_segment,
            nr_slots: total as u32,
            nr_buckets: (total as u32 / 2).max(1),
            buckets: atomics32((n / 2).max(1)),
            key_words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            next: atomics32(n),
            segments: (0..nr_segments).map(|_| SegmentMeta::default()).collect(),
            next_seq: AtomicU64::new(1),
            reclaim_epoch: AtomicU64::new(0),
            reclaimer_taken: AtomicBool::new(false),
            seq_lock: Mutex::new(()),
            qsbr: Qsbr::new(),
        })
    }

    /// The QSBR domain readers must register with.
    pub fn qsbr(&self) -> &Arc<Qsbr> {
        &self.qsbr
    }

    /// Registers the calling thread as a participant.
    pub fn register(&self) -> Participant {
        self.qsbr.register()
    }

    /// The reclaimer capability; `Some` exactly once.
    pub fn reclaimer(&self) -> Option<Reclaimer> {
        (!self.reclaimer_taken.swap(true, AcqRel)).then_some(Reclaimer { index_id: self.id })
    }

    pub fn nr_slots(&self) -> u32 {
        self.nr_slots
    }
    pub fn nr_segments(&self) -> u32 {
        self.nr_segments
    }
    pub fn slots_per_segment(&self) -> u32 {
        self.slots_per_segment
    }

    /// Slot id of (segment, index).
    pub fn slot_id(&self, seg: SegmentId, index: u32) -> SlotId {
        SlotId(seg.0 * self.slots_per_segment + index)
    }

    fn loc(&self, slot: u32) -> (usize, u32) {
        ((slot / self.slots_per_segment) as usize, slot % self.slots_per_segment)
    }

    fn seg(&self, s: SegmentId) -> Result<&SegmentMeta, IndexError> {
        self.segments.get(s.0 as usize).ok_or(IndexError::BadSegment { seg: s })
    }

    fn bucket_of(&self, key: BlockKey) -> usize {
        (((mix(key.0) >> 32) * u64::from(self.nr_buckets)) >> 32) as usize
    }

    fn version_of(&self, slot: u32) -> Version {
        let (seg, index) = self.loc(slot);
        Version { seq: Seq(self.segments[seg].seq.load(Acquire)), index }
    }

    /// Measured RAM: the three per-slot arrays and the segment table.
    pub fn memory_usage(&self) -> MemoryUsage {
        MemoryUsage {
            slots: u64::from(self.nr_slots),
            per_slot_bytes: (size_of::<AtomicU32>() * self.buckets.len()
                + size_of::<AtomicU64>() * self.key_words.len()
                + size_of::<AtomicU32>() * self.next.len()) as u64,
            per_segment_bytes: (size_of::<SegmentMeta>() * self.segments.len()) as u64,
        }
    }

    // ---- segment lifecycle --------------------------------------------------

    /// Hands out every `Unused` segment (after recovery: those it did not
    /// claim). Needs the reclaimer so tokens are created in one place.
    pub fn take_unused(&self, r: &mut Reclaimer) -> Result<Vec<FreeSegment>, IndexError> {
        self.check_reclaimer(r)?;
        let mut out = Vec::new();
        for (i, m) in self.segments.iter().enumerate() {
            let unused = SegmentState::Unused as u32;
            if m.state.compare_exchange(unused, SegmentState::Free as u32, AcqRel, Acquire).is_ok() {
                out.push(FreeSegment { index_id: self.id, seg: SegmentId(i as u32) });
            }
        }
        Ok(out)
    }

    /// Opens a free segment with the next seq of the cache set.
    pub fn open_segment(&self, f: FreeSegment) -> Result<OpenSegment, IndexError> {
        if f.index_id != self.id {
            return Err(IndexError::ForeignToken);
        }
        let m = self.seg(f.seg)?;
        let _g = lock(&self.seq_lock);
        let seq = self.next_seq.fetch_add(1, SeqCst);
        m.seq.store(seq, Release);
        m.state.store(SegmentState::Open as u32, SeqCst);
        Ok(OpenSegment { index_id: self.id, seg: f.seg, seq: Seq(seq) })
    }

    /// Recovery: claims an `Unused` segment found valid on disk with its
    /// on-disk seq; install its records, then `seal` it.
    pub fn recover_segment(&self, seg: SegmentId, seq: Seq) -> Result<OpenSegment, IndexError> {
        let m = self.seg(seg)?;
        if seq.0 == 0 || seq.0 == u64::MAX {
            return Err(IndexError::BadSeq { seq });
        }
        let _g = lock(&self.seq_lock);
        let unused = SegmentState::Unused as u32;
        if let Err(s) = m.state.compare_exchange(unused, SegmentState::Open as u32, AcqRel, Acquire) {
            return Err(IndexError::WrongState { seg, state: SegmentState::from_u32(s) });
        }
        m.seq.store(seq.0, Release);
        self.next_seq.fetch_max(seq.0 + 1, SeqCst);
        Ok(OpenSegment { index_id: self.id, seg, seq })
    }

    /// Recovery: makes sure new segments get seqs above `seq` (e.g. the
    /// superblock's writeback_seq or the highest seq of a torn segment).
    pub fn advance_seq_past(&self, seq: Seq) {
        self.next_seq.fetch_max(seq.0.saturating_add(1), SeqCst);
    }

    /// No more installs into this segment.
    pub fn seal(&self, o: OpenSegment) -> Result<SegmentId, IndexError> {
        if o.index_id != self.id {
            return Err(IndexError::ForeignToken);
        }
        self.seg(o.seg)?.state.store(SegmentState::Sealed as u32, SeqCst);
        Ok(o.seg)
    }

    /// Bookkeeping snapshot of one segment.
    pub fn segment_info(&self, seg: SegmentId) -> Result<SegmentInfo, IndexError> {
        let m = self.seg(seg)?;
        Ok(SegmentInfo {
            state: SegmentState::from_u32(m.state.load(Acquire)),
            seq: Seq(m.seq.load(Acquire)),
            gen: m.gen.load(Acquire),
            live: m.live.load(Acquire),
            dirty: m.dirty.load(Acquire),
        })
    }

    /// Highest seq W such that every segment with seq <= W is sealed with no
    /// live dirty entry (or gone). Persist it as the superblock's
    /// `writeback_seq`, then pass it to [`Self::begin_reclaim`].
    pub fn clean_watermark(&self) -> Seq {
        let _g = lock(&self.seq_lock);
        let mut low = self.next_seq.load(SeqCst);
        for m in self.segments.iter() {
            let st = SegmentState::from_u32(m.state.load(SeqCst));
            let busy = match st {
                SegmentState::Open => true,
                SegmentState::Sealed => m.dirty.load(SeqCst) > 0,
                _ => false,
            };
            if busy {
                low = low.min(m.seq.load(SeqCst));
            }
        }
        Seq(low.saturating_sub(1))
    }

    // ---- install / lookup ---------------------------------------------------

    /// Installs `key` at data slot `index` of `open`. Fails with `Newer` (and
    /// publishes nothing) if a newer version of the key is installed: the
    /// write path then retries in a fresh, higher-seq segment; recovery and
    /// promotion drop their older copy.
    pub fn install(
        &self,
        p: &Participant,
        open: &OpenSegment,
        index: u32,
        key: BlockKey,
        kind: EntryKind,
    ) -> Result<Installed, InstallError> {
        let slot = self.check_install(p, open, index)?;
        self.publish(slot, key, kind.bits(), Cond::NotOlder)
    }

    /// Takes a ticket for promoting `key`: call BEFORE reading the block from
    /// the backing device.
    pub fn promotion_ticket(&self, p: &Participant, key: BlockKey) -> PromotionTicket {
        debug_assert!(p.belongs_to(&self.qsbr) && p.is_online());
        let reclaim_epoch = self.reclaim_epoch.load(SeqCst);
        let h = self.buckets[self.bucket_of(key)].load(Acquire);
        let observed = self.newest_in_chain(h, key).map(|(_, v, _)| v);
        PromotionTicket { key, observed, reclaim_epoch }
    }

    /// A promotion ticket for a block a read MISSED, or `None` if the index now holds a
    /// version a lookup would return: the block was cached between the read's lookup and
    /// this ticket, so the backing device may hold older data than that version, and a
    /// copy installed under a ticket that observed it would supersede it with the older
    /// data (a clean copy, so the newer write would never be written back either).
    ///
    /// Invariant: a read-miss promotion only installs over what a miss can see — no
    /// version, a tombstone, or a version in a segment under reclaim (clean: the backing
    /// device holds its data or newer). Anything installed after the ticket makes the
    /// install fail (`Changed`), as for `promotion_ticket`.
    pub fn miss_ticket(&self, p: &Participant, key: BlockKey) -> Option<PromotionTicket> {
        debug_assert!(p.belongs_to(&self.qsbr) && p.is_online());
        let reclaim_epoch = self.reclaim_epoch.load(SeqCst);
        let h = self.buckets[self.bucket_of(key)].load(Acquire);
        let newest = self.newest_in_chain(h, key);
        if let Some((s, _, w)) = newest {
            let st = SegmentState::from_u32(self.segments[self.loc(s).0].state.load(SeqCst));
            if w & F_TOMBSTONE == 0 && matches!(st, SegmentState::Open | SegmentState::Sealed) {
                return None;
            }
        }
        Some(PromotionTicket { key, observed: newest.map(|(_, v, _)| v), reclaim_epoch })
    }

    /// Installs a clean promoted copy only if nothing about the key changed
    /// since `ticket` (no install, no reclaim anywhere) and the slot is newer
    /// than what the ticket saw; otherwise `Changed`/`Newer` and the copy is
    /// dropped.
    pub fn install_promotion(
        &self,
        p: &Participant,
        open: &OpenSegment,
        index: u32,
        ticket: &PromotionTicket,
        zero: bool,
    ) -> Result<Installed, InstallError> {
        let slot = self.check_install(p, open, index)?;
        let kind = EntryKind::from_bool(zero);
        self.publish(slot, ticket.key, kind.bits(), Cond::Unchanged(*ticket))
    }

    fn check_install(&self, p: &Participant, open: &OpenSegment, index: u32) -> Result<u32, InstallError> {
        debug_assert!(p.belongs_to(&self.qsbr) && p.is_online(), "install outside a read-side section");
        if open.index_id != self.id {
            return Err(InstallError::ForeignToken);
        }
        if index >= self.slots_per_segment {
            return Err(InstallError::BadIndex { index });
        }
        debug_assert_eq!(self.segments[open.seg.0 as usize].state.load(Relaxed), SegmentState::Open as u32);
        Ok(self.slot_id(open.seg, index).0)
    }

    fn publish(&self, slot: u32, key: BlockKey, kind: u64, cond: Cond) -> Result<Installed, InstallError> {
        let s = slot as usize;
        let (seg, _) = self.loc(slot);
        let meta = &self.segments[seg];
        let my = self.version_of(slot);
        debug_assert!(my.seq.0 > 0 && my.seq.0 < self.next_seq.load(Relaxed));
        let kw = &self.key_words[s];
        if kw.load(Acquire) & F_VALID != 0 {
            return Err(InstallError::SlotInUse { slot: SlotId(slot) });
        }
        let dirty = kind & F_DIRTY != 0;
        // Count first: a concurrent supersede/mark_clean of this slot can then
        // never underflow the counters.
        meta.live.fetch_add(1, AcqRel);
        if dirty {
            meta.dirty.fetch_add(1, AcqRel);
        }
        kw.store(key.0 | F_VALID | F_LINKED | F_LIVE | kind, Relaxed);
        let b = &self.buckets[self.bucket_of(key)];
        let undo = || {
            kw.store(0, Relaxed);
            meta.live.fetch_sub(1, AcqRel);
            if dirty {
                meta.dirty.fetch_sub(1, AcqRel);
            }
        };
        let prev = loop {
            let h = b.load(Acquire);
            let newest = self.newest_in_chain(h, key);
            let newest_v = newest.map(|(_, v, _)| v);
            if let Some(v) = newest_v {
                if v > my {
                    undo();
                    return Err(InstallError::Newer { current: v });
                }
            }
            if let Cond::Unchanged(t) = &cond {
                if newest_v != t.observed || self.reclaim_epoch.load(SeqCst) != t.reclaim_epoch {
                    undo();
                    return Err(InstallError::Changed);
                }
            }
            self.next[s].store(h, Relaxed);
            if b.compare_exchange(h, slot + 1, AcqRel, Acquire).is_ok() {
                break newest;
            }
        };
        if let Some((old, _, _)) = prev {
            self.retire(old);
        }
        Ok(Installed { version: my, superseded: prev.map(|(_, v, _)| v) })
    }

    /// Clears LIVE on a superseded or unlinked node and fixes the counters.
    /// Idempotent: only the caller that clears LIVE counts.
    fn retire(&self, slot: u32) {
        let prev = self.key_words[slot as usize].fetch_and(!F_LIVE, AcqRel);
        if prev & F_LIVE != 0 {
            let m = &self.segments[self.loc(slot).0];
            m.live.fetch_sub(1, AcqRel);
            if prev & F_DIRTY != 0 {
                m.dirty.fetch_sub(1, AcqRel);
            }
        }
    }

    /// Newest (slot, version, key_word) for `key` in the chain from `head`.
    fn newest_in_chain(&self, head: u32, key: BlockKey) -> Option<(u32, Version, u64)> {
        let mut cur = head;
        let mut best: Option<(u32, Version, u64)> = None;
        let mut last_same: Option<Version> = None;
        let mut steps = 0u32;
        while cur != 0 {
            let s = cur - 1;
            let w = self.key_words[s as usize].load(Acquire);
            if w & F_VALID != 0 && w & KEY_MASK == key.0 {
                let v = self.version_of(s);
                // Versions of one key are pushed in increasing order.
                debug_assert!(last_same.is_none_or(|l| l > v), "key versions not decreasing along chain");
                last_same = Some(v);
                if best.is_none_or(|(_, bv, _)| v > bv) {
                    best = Some((s, v, w));
                }
            }
            cur = self.next[s as usize].load(Acquire);
            steps += 1;
            if steps > self.nr_slots {
                debug_assert!(false, "cycle in bucket chain");
                break;
            }
        }
        best
    }

    /// Wait-free lookup. Misses on no entry, on a tombstone, and on an entry
    /// whose segment is being reclaimed (clean by then, so the backing device
    /// has the data).
    pub fn lookup(&self, p: &Participant, key: BlockKey) -> Option<Hit> {
        debug_assert!(p.belongs_to(&self.qsbr) && p.is_online(), "lookup outside a read-side section");
        let h = self.buckets[self.bucket_of(key)].load(Acquire);
        let (s, version, w) = self.newest_in_chain(h, key)?;
        if w & F_TOMBSTONE != 0 {
            return None;
        }
        let (seg, _) = self.loc(s);
        let m = &self.segments[seg];
        let gen = m.gen.load(SeqCst);
        let st = SegmentState::from_u32(m.state.load(SeqCst));
        if !matches!(st, SegmentState::Open | SegmentState::Sealed) {
            return None;
        }
        Some(Hit {
            slot: SlotId(s),
            segment: SegmentId(seg as u32),
            version,
            gen,
            dirty: w & F_DIRTY != 0,
            zero: w & F_ZERO != 0,
        })
    }

    /// Whether the newest version of `key` is a tombstone in an open or sealed segment: a
    /// lookup misses, yet replay would need that tombstone (it may be only in RAM) to keep
    /// an older record of the block from coming back.
    pub fn tombstoned(&self, p: &Participant, key: BlockKey) -> bool {
        debug_assert!(p.belongs_to(&self.qsbr) && p.is_online());
        let h = self.buckets[self.bucket_of(key)].load(Acquire);
        let Some((s, _, w)) = self.newest_in_chain(h, key) else { return false };
        let st = SegmentState::from_u32(self.segments[self.loc(s).0].state.load(SeqCst));
        w & F_TOMBSTONE != 0 && matches!(st, SegmentState::Open | SegmentState::Sealed)
    }

    /// A foreground read hit `hit`: set its slot's referenced bit (second chance at
    /// reclaim). Call it in the same read-side section as the lookup that returned `hit`
    /// (no quiescent state in between): the slot then cannot have been released, so the
    /// bit lands on the entry the lookup saw, never on a later use of the slot. Stores
    /// only when the bit is not set yet (a hot block costs one load per hit).
    pub fn mark_referenced(&self, p: &Participant, hit: &Hit) {
        debug_assert!(p.belongs_to(&self.qsbr) && p.is_online(), "mark_referenced outside a read-side section");
        let Some(kw) = self.key_words.get(hit.slot.0 as usize) else { return };
        let w = kw.load(Relaxed);
        if w & F_REFERENCED == 0 && w & F_LIVE != 0 {
            kw.fetch_or(F_REFERENCED, Relaxed);
        }
    }

    /// Whether the slot's referenced bit is set (tests and diagnostics).
    pub fn is_referenced(&self, slot: SlotId) -> bool {
        self.key_words.get(slot.0 as usize).is_some_and(|w| w.load(Relaxed) & F_REFERENCED != 0)
    }

    /// Up to `max` live, clean, data-carrying entries of `seg` whose referenced bit is set,
    /// in slot order: the blocks reclaim copies forward (second chance).
    pub fn referenced_slots(&self, p: &Participant, seg: SegmentId, max: usize) -> Result<Vec<Referenced>, IndexError> {
        debug_assert!(p.belongs_to(&self.qsbr) && p.is_online());
        let m = self.seg(seg)?;
        let gen = m.gen.load(SeqCst);
        let base = seg.0 * self.slots_per_segment;
        let mut out = Vec::new();
        for i in 0..self.slots_per_segment {
            if out.len() >= max {
                break;
            }
            let slot = base + i;
            let w = self.key_words[slot as usize].load(Acquire);
            let want = F_VALID | F_LINKED | F_LIVE | F_REFERENCED;
            if w & want == want && w & (F_DIRTY | F_TOMBSTONE | F_ZERO) == 0 {
                out.push(Referenced {
                    slot: SlotId(slot),
                    key: BlockKey(w & KEY_MASK),
                    version: self.version_of(slot),
                    gen,
                });
            }
        }
        Ok(out)
    }

    /// A ticket to copy `r` forward (install a clean copy of it with
    /// [`Self::install_promotion`]), or `None` if the slot is no longer the newest version
    /// of its key or its segment began reclaim since `r` was listed. The ticket is a
    /// promotion ticket that observed exactly `r`'s version, so the copy publishes only if
    /// nothing installed a version of the key in between: a concurrent write always wins.
    pub fn copy_forward_ticket(&self, p: &Participant, r: &Referenced) -> Option<PromotionTicket> {
        debug_assert!(p.belongs_to(&self.qsbr) && p.is_online());
        let m = self.segments.get(self.loc(r.slot.0).0)?;
        if m.gen.load(SeqCst) != r.gen {
            return None;
        }
        let w = self.key_words[r.slot.0 as usize].load(Acquire);
        if w & (F_VALID | F_LIVE) != F_VALID | F_LIVE || w & KEY_MASK != r.key.0 || w & (F_TOMBSTONE | F_ZERO) != 0 {
            return None;
        }
        // Only written-back segments are reclaimed: nothing live in them is dirty.
        debug_assert!(w & F_DIRTY == 0, "copy-forward of a dirty block (slot {})", r.slot.0);
        if w & F_DIRTY != 0 {
            return None;
        }
        let t = self.promotion_ticket(p, r.key);
        (t.observed == Some(r.version)).then_some(t)
    }

    /// After reading a hit's slot from the cache device (possibly across
    /// quiescent states): `false` means the segment began reclaim since the
    /// lookup and the bytes may belong to its next use — look up again.
    pub fn still_valid(&self, hit: &Hit) -> bool {
        self.segments.get(hit.segment.0 as usize).is_some_and(|m| m.gen.load(SeqCst) == hit.gen)
    }

    /// Writeback finished for `slot` (captured with `gen`). Returns whether a
    /// DIRTY bit was cleared. A slot whose segment has since begun reclaim is
    /// left alone.
    pub fn mark_clean(&self, p: &Participant, slot: SlotId, gen: u32) -> bool {
        debug_assert!(p.belongs_to(&self.qsbr) && p.is_online());
        if slot.0 >= self.nr_slots {
            return false;
        }
        let m = &self.segments[self.loc(slot.0).0];
        if m.gen.load(SeqCst) != gen {
            return false;
        }
        let prev = self.key_words[slot.0 as usize].fetch_and(!F_DIRTY, AcqRel);
        if prev & F_DIRTY != 0 && prev & F_LIVE != 0 {
            m.dirty.fetch_sub(1, AcqRel);
        }
        prev & F_DIRTY != 0
    }

    /// Live dirty entries of a segment, in slot order.
    pub fn dirty_slots(&self, p: &Participant, seg: SegmentId) -> Result<Vec<DirtySlot>, IndexError> {
        debug_assert!(p.belongs_to(&self.qsbr) && p.is_online());
        let m = self.seg(seg)?;
        let gen = m.gen.load(SeqCst);
        let base = seg.0 * self.slots_per_segment;
        let mut out = Vec::new();
        for i in 0..self.slots_per_segment {
            let slot = base + i;
            let w = self.key_words[slot as usize].load(Acquire);
            let want = F_VALID | F_LINKED | F_LIVE | F_DIRTY;
            if w & want == want {
                out.push(DirtySlot {
                    slot: SlotId(slot),
                    key: BlockKey(w & KEY_MASK),
                    version: self.version_of(slot),
                    gen,
                    zero: w & F_ZERO != 0,
                });
            }
        }
        Ok(out)
    }

    // ---- reclaim --------------------------------------------------------------

    fn check_reclaimer(&self, r: &Reclaimer) -> Result<(), IndexError> {
        (r.index_id == self.id).then_some(()).ok_or(IndexError::ForeignToken)
    }

    /// Step 1: a sealed segment with no live dirty entry and
    /// `seq <= persisted_writeback_seq` (the superblock value already on
    /// disk) stops serving lookups; its gen is bumped.
    pub fn begin_reclaim(
        &self,
        r: &mut Reclaimer,
        seg: SegmentId,
        persisted_writeback_seq: Seq,
    ) -> Result<ReclaimStarted, IndexError> {
        self.check_reclaimer(r)?;
        let m = self.seg(seg)?;
        let st = SegmentState::from_u32(m.state.load(SeqCst));
        if st != SegmentState::Sealed {
            return Err(IndexError::WrongState { seg, state: st });
        }
        let dirty = m.dirty.load(SeqCst);
        if dirty != 0 {
            return Err(IndexError::Dirty { seg, dirty });
        }
        let seq = Seq(m.seq.load(SeqCst));
        if seq > persisted_writeback_seq {
            return Err(IndexError::NotWrittenBack { seg, seq, writeback_seq: persisted_writeback_seq });
        }
        m.gen.fetch_add(1, SeqCst);
        self.reclaim_epoch.fetch_add(1, SeqCst);
        m.state.store(SegmentState::Reclaiming as u32, SeqCst);
        Ok(ReclaimStarted { seg, epoch: self.qsbr.epoch() })
    }

    /// Step 2 (after a grace period since step 1; waits for one if needed,
    /// up to `timeout`): removes every entry of the segment from its chain,
    /// together with all older versions of the same keys.
    pub fn unlink_segment(
        &self,
        r: &mut Reclaimer,
        t: ReclaimStarted,
        timeout: Duration,
    ) -> Result<UnlinkedSegment, (ReclaimStarted, IndexError)> {
        if let Err(e) = self.check_reclaimer(r) {
            return Err((t, e));
        }
        if !self.qsbr.elapsed_since(t.epoch) {
            if let Err(e) = self.qsbr.synchronize(timeout) {
                return Err((t, IndexError::Grace(e)));
            }
        }
        let base = t.seg.0 * self.slots_per_segment;
        for i in 0..self.slots_per_segment {
            self.unlink_with_older(base + i);
        }
        let m = &self.segments[t.seg.0 as usize];
        debug_assert_eq!(m.live.load(SeqCst), 0);
        debug_assert_eq!(m.dirty.load(SeqCst), 0);
        m.state.store(SegmentState::Unlinked as u32, SeqCst);
        Ok(UnlinkedSegment { seg: t.seg, epoch: self.qsbr.epoch() })
    }

    /// Step 3 (after a grace period since step 2): clears the slots and
    /// returns the segment for reuse.
    pub fn release_segment(
        &self,
        r: &mut Reclaimer,
        u: UnlinkedSegment,
        timeout: Duration,
    ) -> Result<FreeSegment, (UnlinkedSegment, IndexError)> {
        if let Err(e) = self.check_reclaimer(r) {
            return Err((u, e));
        }
        if !self.qsbr.elapsed_since(u.epoch) {
            if let Err(e) = self.qsbr.synchronize(timeout) {
                return Err((u, IndexError::Grace(e)));
            }
        }
        let base = (u.seg.0 * self.slots_per_segment) as usize;
        for s in base..base + self.slots_per_segment as usize {
            self.key_words[s].store(0, Relaxed);
            self.next[s].store(0, Relaxed);
        }
        let m = &self.segments[u.seg.0 as usize];
        m.live.store(0, Relaxed);
        m.dirty.store(0, Relaxed);
        m.seq.store(0, Relaxed);
        m.state.store(SegmentState::Free as u32, SeqCst);
        Ok(FreeSegment { index_id: self.id, seg: u.seg })
    }

    /// Steps 1-3 in one call (two grace periods).
    pub fn reclaim_segment(
        &self,
        r: &mut Reclaimer,
        seg: SegmentId,
        persisted_writeback_seq: Seq,
        timeout: Duration,
    ) -> Result<FreeSegment, IndexError> {
        let t = self.begin_reclaim(r, seg, persisted_writeback_seq)?;
        let u = self.unlink_segment(r, t, timeout).map_err(|(_, e)| e)?;
        self.release_segment(r, u, timeout).map_err(|(_, e)| e)
    }

    fn unlink_with_older(&self, x: u32) {
        let w = self.key_words[x as usize].load(Acquire);
        if w & F_LINKED == 0 {
            return;
        }
        let key = BlockKey(w & KEY_MASK);
        let vx = self.version_of(x);
        let b = &self.buckets[self.bucket_of(key)];
        // Older versions first, oldest first, `x` last: a concurrent walker
        // that still reaches an older version then also reaches a newer one.
        let mut older = Vec::new();
        let mut cur = b.load(Acquire);
        while cur != 0 {
            let s = cur - 1;
            let sw = self.key_words[s as usize].load(Acquire);
            if s != x && sw & F_LINKED != 0 && sw & KEY_MASK == key.0 && self.version_of(s) < vx {
                older.push(s);
            }
            cur = self.next[s as usize].load(Acquire);
        }
        for &o in older.iter().rev() {
            self.splice(b, o);
        }
        self.splice(b, x);
    }

    fn splice(&self, b: &AtomicU32, x: u32) {
        loop {
            let h = b.load(Acquire);
            let succ = self.next[x as usize].load(Acquire);
            if h == x + 1 {
                if b.compare_exchange(h, succ, AcqRel, Acquire).is_ok() {
                    break;
                }
                continue; // an insert landed on top of x; x is now a middle node
            }
            let mut cur = h;
            let mut found = false;
            while cur != 0 {
                let s = cur - 1;
                let n = self.next[s as usize].load(Acquire);
                if n == x + 1 {
                    // Middle links change only here, by the single reclaimer.
                    self.next[s as usize].store(succ, Release);
                    found = true;
                    break;
                }
                cur = n;
            }
            debug_assert!(found, "slot {x} not in its chain");
            break;
        }
        let prev = self.key_words[x as usize].fetch_and(!F_LINKED, AcqRel);
        debug_assert!(prev & F_LINKED != 0);
        self.retire(x);
    }
}

impl EntryKind {
    fn from_bool(zero: bool) -> Self {
        if zero {
            Self::Zero { dirty: false }
        } else {
            Self::Clean
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    const T: Duration = Duration::from_secs(5);

    fn key(n: u64) -> BlockKey {
        BlockKey::new(BackingIdx((n % 3) as u8), Lba(n * 7)).unwrap()
    }

    struct Fx {
        ix: BlockIndex,
        r: Reclaimer,
        free: Vec<FreeSegment>,
    }

    fn fx(segs: u32, sps: u32) -> Fx {
        let ix = BlockIndex::new(segs, sps).unwrap();
        let mut r = ix.reclaimer().unwrap();
        let free = ix.take_unused(&mut r).unwrap();
        Fx { ix, r, free }
    }

    fn reclaim(f: &mut Fx, p: &mut Participant, seg: SegmentId) -> Result<(), IndexError> {
        p.offline();
        let wm = f.ix.clean_watermark();
        let res = f.ix.reclaim_segment(&mut f.r, seg, wm, T);
        p.online();
        f.free.push(res?);
        Ok(())
    }

    #[test]
    fn key_packing() {
        let k = BlockKey::new(BackingIdx(15), Lba(LBA_LIMIT - 1)).unwrap();
        assert_eq!(k.backing(), BackingIdx(15));
        assert_eq!(k.lba(), Lba(LBA_LIMIT - 1));
        assert!(BlockKey::new(BackingIdx(0), Lba(LBA_LIMIT)).is_none());
        let r = BlockRecordOnDisk::without_data(Lba(77), BackingIdx(3), record_flags::TOMBSTONE);
        assert_eq!(BlockKey::from_record(&r), BlockKey::new(BackingIdx(3), Lba(77)).unwrap());
        assert_eq!(
            EntryKind::from_record_flags(record_flags::CLEAN | record_flags::ZERO),
            Some(EntryKind::Zero { dirty: false })
        );
        assert_eq!(EntryKind::from_record_flags(record_flags::TOMBSTONE | record_flags::ZERO), None);
    }

    #[test]
    fn memory_is_at_most_16_bytes_per_slot() {
        // Default geometry: 4 KiB blocks, 512 KiB segments -> 127 slots; 1 GiB ~ 2047 segments.
        let ix = BlockIndex::new(2047, 127).unwrap();
        let m = ix.memory_usage();
        assert_eq!(m.slots, 2047 * 127);
        // 4 B per two slots (bucket heads) + 8 B key word + 4 B next link.
        assert!(m.per_slot_bytes <= 14 * m.slots + 4, "{} B for {} slots", m.per_slot_bytes, m.slots);
        assert_eq!(m.per_segment_bytes, 24 * 2047);
        let total = (m.per_slot_bytes + m.per_segment_bytes) as f64 / m.slots as f64;
        assert!(total < 14.2, "{total} B/slot including the segment table");
        // Worst geometry (4 KiB blocks, 128 KiB segments, 31 slots): still under 16 B.
        let ix = BlockIndex::new(1000, 31).unwrap();
        let m = ix.memory_usage();
        assert!(m.per_slot_bytes <= 14 * m.slots + 4);
        assert!(((m.per_slot_bytes + m.per_segment_bytes) as f64 / m.slots as f64) < 16.0);
    }

    #[test]
    fn newer_wins_and_older_is_rejected() {
        let mut f = fx(4, 8);
        let p = f.ix.register();
        let old = f.ix.open_segment(f.free.pop().unwrap()).unwrap();
        let new = f.ix.open_segment(f.free.pop().unwrap()).unwrap();
        assert!(new.seq() > old.seq());
        let k = key(1);
        let a = f.ix.install(&p, &new, 0, k, EntryKind::Dirty).unwrap();
        assert_eq!(a.superseded, None);
        // An older write completing later never wins.
        assert_eq!(f.ix.install(&p, &old, 5, k, EntryKind::Dirty), Err(InstallError::Newer { current: a.version }));
        let info = f.ix.segment_info(old.id()).unwrap();
        assert_eq!((info.live, info.dirty), (0, 0), "a rejected install leaves no trace");
        let h = f.ix.lookup(&p, k).unwrap();
        assert_eq!((h.version, h.dirty, h.segment), (a.version, true, new.id()));
        // Later index in the same segment is newer.
        let b = f.ix.install(&p, &new, 3, k, EntryKind::Clean).unwrap();
        assert_eq!(b.superseded, Some(a.version));
        assert_eq!(f.ix.segment_info(new.id()).unwrap().live, 1);
        assert_eq!(f.ix.segment_info(new.id()).unwrap().dirty, 0, "superseded dirty copy needs no writeback");
        assert!(!f.ix.lookup(&p, k).unwrap().dirty);
        // Tombstone makes it a miss.
        f.ix.install(&p, &new, 4, k, EntryKind::Tombstone).unwrap();
        assert_eq!(f.ix.lookup(&p, k), None);
        assert_eq!(
            f.ix.install(&p, &new, 4, key(2), EntryKind::Clean),
            Err(InstallError::SlotInUse { slot: f.ix.slot_id(new.id(), 4) })
        );
        assert_eq!(f.ix.install(&p, &new, 8, key(2), EntryKind::Clean), Err(InstallError::BadIndex { index: 8 }));
        // Zero entries.
        f.ix.install(&p, &new, 5, key(3), EntryKind::Zero { dirty: true }).unwrap();
        let z = f.ix.lookup(&p, key(3)).unwrap();
        assert!(z.zero && z.dirty);
    }

    #[test]
    fn promotion_never_overwrites_a_newer_write() {
        let mut f = fx(4, 8);
        let p = f.ix.register();
        let promo = f.ix.open_segment(f.free.pop().unwrap()).unwrap();
        let writes = f.ix.open_segment(f.free.pop().unwrap()).unwrap();
        let k = key(9);
        // Plain promotion of a miss.
        let t = f.ix.promotion_ticket(&p, k);
        f.ix.install_promotion(&p, &promo, 0, &t, false).unwrap();
        assert!(!f.ix.lookup(&p, k).unwrap().dirty);
        // A write lands while the promotion reads the backing device.
        let k2 = key(10);
        let t = f.ix.promotion_ticket(&p, k2);
        f.ix.install(&p, &promo, 2, k2, EntryKind::Dirty).unwrap(); // even in a LOWER seq segment
        assert_eq!(f.ix.install_promotion(&p, &writes, 0, &t, false), Err(InstallError::Changed));
        assert!(f.ix.lookup(&p, k2).unwrap().dirty);
        // A write that landed, was written back and reclaimed meanwhile: the
        // reclaim epoch catches it.
        let k3 = key(11);
        let t = f.ix.promotion_ticket(&p, k3);
        let s3 = f.ix.open_segment(f.free.pop().unwrap()).unwrap();
        let i = f.ix.install(&p, &s3, 0, k3, EntryKind::Dirty).unwrap();
        let seg3 = f.ix.seal(s3).unwrap();
        assert!(f.ix.mark_clean(&p, f.ix.slot_id(seg3, 0), f.ix.segment_info(seg3).unwrap().gen));
        let mut p = p;
        // seg3 cannot be reclaimed while lower-seq segments are open...
        assert_eq!(f.ix.clean_watermark(), Seq(promo.seq().0 - 1));
        p.offline();
        assert!(matches!(
            f.ix.reclaim_segment(&mut f.r, seg3, f.ix.clean_watermark(), T),
            Err(IndexError::NotWrittenBack { .. })
        ));
        // ... so pretend the writeback seq covers it (the test bypasses the rule).
        f.ix.reclaim_segment(&mut f.r, seg3, i.version.seq, T).unwrap();
        p.online();
        assert_eq!(f.ix.lookup(&p, k3), None);
        assert_eq!(f.ix.install_promotion(&p, &writes, 1, &t, false), Err(InstallError::Changed));
        // Promotion into an older segment than what it observed: Newer.
        let k4 = key(12);
        f.ix.install(&p, &writes, 2, k4, EntryKind::Tombstone).unwrap();
        let t = f.ix.promotion_ticket(&p, k4);
        assert!(matches!(f.ix.install_promotion(&p, &promo, 3, &t, false), Err(InstallError::Newer { .. })));
    }

    #[test]
    fn a_miss_ticket_is_refused_once_the_block_is_cached() {
        let mut f = fx(4, 8);
        let p = f.ix.register();
        let o = f.ix.open_segment(f.free.pop().unwrap()).unwrap();
        let promo = f.ix.open_segment(f.free.pop().unwrap()).unwrap();
        // Absent: a ticket, and the promotion installs.
        let k = key(1);
        let t = f.ix.miss_ticket(&p, k).expect("absent block");
        f.ix.install_promotion(&p, &promo, 0, &t, false).unwrap();
        // Cached (dirty or clean) since the read's lookup missed it: no ticket at all - a
        // plain promotion_ticket would observe the write and let older data replace it.
        let k2 = key(2);
        f.ix.install(&p, &o, 0, k2, EntryKind::Dirty).unwrap();
        assert_eq!(f.ix.miss_ticket(&p, k2), None);
        let t = f.ix.promotion_ticket(&p, k2);
        assert!(f.ix.install_promotion(&p, &promo, 1, &t, false).is_ok(), "the hole miss_ticket closes");
        assert_eq!(f.ix.miss_ticket(&p, k), None, "a promoted copy is cached too");
        // A tombstone reads as a miss: ticket, and a later install still wins.
        let k3 = key(3);
        f.ix.install(&p, &o, 1, k3, EntryKind::Tombstone).unwrap();
        let t = f.ix.miss_ticket(&p, k3).expect("tombstoned block");
        f.ix.install(&p, &o, 2, k3, EntryKind::Dirty).unwrap();
        assert_eq!(f.ix.install_promotion(&p, &promo, 2, &t, false), Err(InstallError::Changed));
    }

    #[test]
    fn referenced_blocks_are_listed_and_a_copy_forward_loses_to_any_newer_install() {
        let mut f = fx(4, 8);
        let p = f.ix.register();
        let o = f.ix.open_segment(f.free.pop().unwrap()).unwrap();
        let (hot, cold, dirty, gone) = (key(1), key(2), key(3), key(4));
        for (i, (k, kind)) in
            [(hot, EntryKind::Clean), (cold, EntryKind::Clean), (dirty, EntryKind::Dirty), (gone, EntryKind::Clean)]
                .into_iter()
                .enumerate()
        {
            f.ix.install(&p, &o, i as u32, k, kind).unwrap();
        }
        for k in [hot, dirty, gone] {
            let h = f.ix.lookup(&p, k).unwrap();
            assert!(!f.ix.is_referenced(h.slot));
            f.ix.mark_referenced(&p, &h);
            f.ix.mark_referenced(&p, &h); // idempotent
            assert!(f.ix.is_referenced(h.slot));
        }
        let seg = f.ix.seal(o).unwrap();
        // Only live, clean, referenced data blocks are listed; the cap applies.
        let listed = f.ix.referenced_slots(&p, seg, 8).unwrap();
        assert_eq!(listed.iter().map(|r| r.key).collect::<Vec<_>>(), vec![hot, gone]);
        assert_eq!(f.ix.referenced_slots(&p, seg, 1).unwrap().len(), 1);
        // A write after the listing: that block's copy gets no ticket.
        let w = f.ix.open_segment(f.free.pop().unwrap()).unwrap();
        f.ix.install(&p, &w, 0, gone, EntryKind::Dirty).unwrap();
        assert_eq!(f.ix.copy_forward_ticket(&p, &listed[1]), None);
        // The other is copied: a clean, unreferenced, newer version.
        let t = f.ix.copy_forward_ticket(&p, &listed[0]).unwrap();
        let c = f.ix.install_promotion(&p, &w, 1, &t, false).unwrap();
        assert_eq!(c.superseded, Some(listed[0].version));
        let h = f.ix.lookup(&p, hot).unwrap();
        assert!(!h.dirty && h.version == c.version && !f.ix.is_referenced(h.slot));
        assert_eq!(f.ix.segment_info(seg).unwrap().live, 2, "cold and the written-back-pending dirty block");
        // A ticket taken, then a write lands before the install: the copy is stale.
        let t2 = f.ix.copy_forward_ticket(&p, &Referenced { version: c.version, gen: 0, key: hot, slot: h.slot });
        let t2 = t2.unwrap();
        f.ix.install(&p, &w, 2, hot, EntryKind::Dirty).unwrap();
        assert_eq!(f.ix.install_promotion(&p, &w, 3, &t2, false), Err(InstallError::Changed));
        assert!(f.ix.lookup(&p, hot).unwrap().dirty);
        // A stale listing (the segment's generation moved on) gets no ticket.
        let stale = Referenced { gen: listed[0].gen + 1, ..listed[0] };
        assert_eq!(f.ix.copy_forward_ticket(&p, &stale), None);
    }

    #[test]
    fn reclaim_rules_and_recycled_reads() {
        let mut f = fx(3, 4);
        let mut p = f.ix.register();
        let o = f.ix.open_segment(f.free.pop().unwrap()).unwrap();
        let k = key(5);
        f.ix.install(&p, &o, 0, k, EntryKind::Dirty).unwrap();
        f.ix.install(&p, &o, 1, key(6), EntryKind::Clean).unwrap();
        let seg = o.id();
        p.offline();
        assert!(matches!(
            f.ix.begin_reclaim(&mut f.r, seg, Seq(100)),
            Err(IndexError::WrongState { state: SegmentState::Open, .. })
        ));
        p.online();
        let seg = f.ix.seal(o).unwrap();
        assert!(matches!(f.ix.begin_reclaim(&mut f.r, seg, Seq(100)), Err(IndexError::Dirty { dirty: 1, .. })));
        let hit = f.ix.lookup(&p, k).unwrap();
        let ds = f.ix.dirty_slots(&p, seg).unwrap();
        assert_eq!(ds.len(), 1);
        assert_eq!((ds[0].key, ds[0].slot), (k, hit.slot));
        assert!(f.ix.mark_clean(&p, ds[0].slot, ds[0].gen));
        assert!(!f.ix.mark_clean(&p, ds[0].slot, ds[0].gen), "already clean");
        assert_eq!(f.ix.clean_watermark(), Seq(1));
        assert!(matches!(f.ix.begin_reclaim(&mut f.r, seg, Seq(0)), Err(IndexError::NotWrittenBack { .. })));
        // Step by step: a reader that keeps `hit` across the read sees the change.
        let t = f.ix.begin_reclaim(&mut f.r, seg, Seq(1)).unwrap();
        assert!(!f.ix.still_valid(&hit), "gen bumped at begin_reclaim");
        assert_eq!(f.ix.lookup(&p, k), None, "a segment under reclaim is not served");
        assert!(!f.ix.mark_clean(&p, ds[0].slot, ds[0].gen));
        // The reader is online and never quiescent: the grace period times out.
        let (t, e) = f.ix.unlink_segment(&mut f.r, t, Duration::from_millis(30)).unwrap_err();
        assert!(matches!(e, IndexError::Grace(GraceTimeout { stuck: 1, .. })));
        // Announcing quiescent states lets the grace period (on another thread) finish.
        let (ix, r) = (&f.ix, &mut f.r);
        let u = std::thread::scope(|s| {
            let h = s.spawn(move || ix.unlink_segment(r, t, T));
            while !h.is_finished() {
                p.quiescent();
                std::thread::yield_now();
            }
            h.join().unwrap()
        })
        .unwrap();
        p.offline();
        let free = f.ix.release_segment(&mut f.r, u, T).unwrap();
        p.online();
        let info = f.ix.segment_info(seg).unwrap();
        assert_eq!((info.state, info.live, info.dirty), (SegmentState::Free, 0, 0));
        let o2 = f.ix.open_segment(free).unwrap();
        assert_eq!(o2.id(), seg);
        f.ix.install(&p, &o2, 0, key(7), EntryKind::Clean).unwrap();
        assert_eq!(f.ix.lookup(&p, k), None);
        assert!(!f.ix.still_valid(&hit));
        assert!(f.ix.reclaimer().is_none(), "exactly one reclaimer");
        let other = BlockIndex::new(2, 2).unwrap();
        assert!(matches!(other.take_unused(&mut f.r), Err(IndexError::ForeignToken)));
    }

    #[test]
    fn recovery_installs_in_any_order() {
        let ix = BlockIndex::new(4, 4).unwrap();
        let p = ix.register();
        let k = key(1);
        // Newest segment found first.
        let s9 = ix.recover_segment(SegmentId(2), Seq(9)).unwrap();
        ix.install(&p, &s9, 1, k, EntryKind::Dirty).unwrap();
        ix.seal(s9).unwrap();
        let s4 = ix.recover_segment(SegmentId(0), Seq(4)).unwrap();
        assert!(matches!(ix.install(&p, &s4, 3, k, EntryKind::Dirty), Err(InstallError::Newer { .. })));
        ix.install(&p, &s4, 0, key(2), EntryKind::Dirty).unwrap();
        ix.seal(s4).unwrap();
        assert_eq!(ix.lookup(&p, k).unwrap().version, Version { seq: Seq(9), index: 1 });
        assert!(matches!(ix.recover_segment(SegmentId(2), Seq(11)), Err(IndexError::WrongState { .. })));
        ix.advance_seq_past(Seq(20));
        let mut r = ix.reclaimer().unwrap();
        let mut free = ix.take_unused(&mut r).unwrap();
        assert_eq!(free.len(), 2);
        let o = ix.open_segment(free.pop().unwrap()).unwrap();
        assert_eq!(o.seq(), Seq(21));
        assert_eq!(ix.clean_watermark(), Seq(3));
    }

    // ---- oracle property test -------------------------------------------------

    #[derive(Debug, Clone)]
    enum Op {
        Install { newer: bool, key: u8, kind: u8 },
        Promote { newer: bool, key: u8, interfere: bool },
        Lookup { key: u8 },
        Seal { newer: bool },
        MarkClean { key: u8 },
        WritebackAll,
        Reclaim,
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<bool>(), 0u8..8, 0u8..5).prop_map(|(newer, key, kind)| Op::Install { newer, key, kind }),
            2 => (any::<bool>(), 0u8..8, any::<bool>()).prop_map(|(newer, key, interfere)| Op::Promote { newer, key, interfere }),
            4 => (0u8..8).prop_map(|key| Op::Lookup { key }),
            1 => any::<bool>().prop_map(|newer| Op::Seal { newer }),
            2 => (0u8..8).prop_map(|key| Op::MarkClean { key }),
            1 => Just(Op::WritebackAll),
            2 => Just(Op::Reclaim),
        ]
    }

    #[derive(Debug, Clone, Copy)]
    struct ModelEntry {
        version: Version,
        slot: SlotId,
        seg: SegmentId,
        tomb: bool,
        dirty: bool,
        zero: bool,
    }

    fn kind_of(k: u8) -> EntryKind {
        match k {
            0 => EntryKind::Dirty,
            1 => EntryKind::Clean,
            2 => EntryKind::Tombstone,
            3 => EntryKind::Zero { dirty: true },
            _ => EntryKind::Zero { dirty: false },
        }
    }

    struct Model {
        f: Fx,
        p: Participant,
        open: Vec<(OpenSegment, u32)>, // oldest first, at most 2
        sealed: Vec<SegmentId>,
        oracle: HashMap<BlockKey, ModelEntry>,
    }

    impl Model {
        fn open_idx(&mut self, newer: bool) -> Option<usize> {
            while self.open.len() < 2 {
                let fs = self.f.free.pop()?;
                self.open.push((self.f.ix.open_segment(fs).unwrap(), 0));
            }
            let i = if newer { self.open.len() - 1 } else { 0 };
            if self.open[i].1 == self.f.ix.slots_per_segment() {
                self.seal(i);
                return None;
            }
            Some(i)
        }
        fn seal(&mut self, i: usize) {
            let (o, _) = self.open.remove(i);
            self.sealed.push(self.f.ix.seal(o).unwrap());
        }
        fn apply_install(
            &mut self,
            k: BlockKey,
            res: Result<Installed, InstallError>,
            slot: SlotId,
            seg: SegmentId,
            kind: EntryKind,
        ) {
            let cur = self.oracle.get(&k).copied();
            match res {
                Ok(ins) => {
                    assert_eq!(ins.superseded, cur.map(|c| c.version));
                    assert!(cur.is_none_or(|c| c.version < ins.version));
                    let (tomb, dirty, zero) = match kind {
                        EntryKind::Dirty => (false, true, false),
                        EntryKind::Clean => (false, false, false),
                        EntryKind::Tombstone => (true, false, false),
                        EntryKind::Zero { dirty } => (false, dirty, true),
                    };
                    self.oracle.insert(k, ModelEntry { version: ins.version, slot, seg, tomb, dirty, zero });
                }
                Err(InstallError::Newer { current }) => assert_eq!(Some(current), cur.map(|c| c.version)),
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        fn step(&mut self, op: Op) {
            let ix = &self.f.ix;
            match op {
                Op::Install { newer, key: kn, kind } => {
                    let Some(i) = self.open_idx(newer) else { return };
                    let (o, n) = &mut self.open[i];
                    let idx = *n;
                    *n += 1;
                    let (seg, slot) = (o.id(), self.f.ix.slot_id(o.id(), idx));
                    let k = key(kn.into());
                    let res = self.f.ix.install(&self.p, o, idx, k, kind_of(kind));
                    self.apply_install(k, res, slot, seg, kind_of(kind));
                }
                Op::Promote { newer, key: kn, interfere } => {
                    let k = key(kn.into());
                    let t = ix.promotion_ticket(&self.p, k);
                    if interfere {
                        self.step(Op::Install { newer: !newer, key: kn, kind: 0 });
                    }
                    let Some(i) = self.open_idx(newer) else { return };
                    let (o, n) = &mut self.open[i];
                    let idx = *n;
                    *n += 1;
                    let (seg, slot) = (o.id(), self.f.ix.slot_id(o.id(), idx));
                    let before = self.oracle.get(&k).map(|c| c.version);
                    let res = self.f.ix.install_promotion(&self.p, o, idx, &t, false);
                    if res == Err(InstallError::Changed) {
                        assert!(interfere, "spurious Changed");
                        return;
                    }
                    if interfere && res.is_ok() && before != t.observed {
                        panic!("promotion over a concurrent write: {res:?}");
                    }
                    self.apply_install(k, res, slot, seg, EntryKind::Clean);
                }
                Op::Lookup { key: kn } => {
                    let k = key(kn.into());
                    let got = ix.lookup(&self.p, k);
                    match self.oracle.get(&k) {
                        Some(e) if !e.tomb => {
                            let h = got.expect("hit expected");
                            assert_eq!((h.version, h.slot, h.dirty, h.zero), (e.version, e.slot, e.dirty, e.zero));
                            assert!(ix.still_valid(&h));
                        }
                        _ => assert_eq!(got, None),
                    }
                }
                Op::Seal { newer } => {
                    if !self.open.is_empty() {
                        let i = if newer { self.open.len() - 1 } else { 0 };
                        self.seal(i);
                    }
                }
                Op::MarkClean { key: kn } => {
                    let k = key(kn.into());
                    if let Some(e) = self.oracle.get_mut(&k) {
                        let gen = ix.segment_info(e.seg).unwrap().gen;
                        assert_eq!(ix.mark_clean(&self.p, e.slot, gen), e.dirty);
                        e.dirty = false;
                    }
                }
                Op::WritebackAll => {
                    for &seg in &self.sealed {
                        let ds = ix.dirty_slots(&self.p, seg).unwrap();
                        let mut want: Vec<SlotId> =
                            self.oracle.values().filter(|e| e.seg == seg && e.dirty).map(|e| e.slot).collect();
                        want.sort();
                        assert_eq!(ds.iter().map(|d| d.slot).collect::<Vec<_>>(), want);
                        for d in ds {
                            assert!(ix.mark_clean(&self.p, d.slot, d.gen));
                        }
                    }
                    for e in self.oracle.values_mut() {
                        if self.sealed.contains(&e.seg) {
                            e.dirty = false;
                        }
                    }
                }
                Op::Reclaim => {
                    let wm = ix.clean_watermark();
                    let cand = self
                        .sealed
                        .iter()
                        .copied()
                        .filter(|s| {
                            let i = ix.segment_info(*s).unwrap();
                            i.dirty == 0 && i.seq <= wm
                        })
                        .min_by_key(|s| ix.segment_info(*s).unwrap().seq);
                    if let Some(seg) = cand {
                        reclaim(&mut self.f, &mut self.p, seg).unwrap();
                        self.sealed.retain(|s| *s != seg);
                        self.oracle.retain(|_, e| e.seg != seg);
                    } else if let Some(&seg) = self.sealed.iter().find(|s| ix.segment_info(**s).unwrap().dirty > 0) {
                        self.p.offline();
                        let r = self.f.ix.begin_reclaim(&mut self.f.r, seg, Seq(u64::MAX - 1));
                        self.p.online();
                        assert!(matches!(r, Err(IndexError::Dirty { .. })));
                    }
                }
            }
            self.check_counters();
        }
        fn check_counters(&self) {
            for s in 0..self.f.ix.nr_segments() {
                let seg = SegmentId(s);
                let info = self.f.ix.segment_info(seg).unwrap();
                let live = self.oracle.values().filter(|e| e.seg == seg).count() as u32;
                let dirty = self.oracle.values().filter(|e| e.seg == seg && e.dirty).count() as u32;
                assert_eq!((info.live, info.dirty), (live, dirty), "counters of {seg:?} ({:?})", info.state);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn prop_matches_oracle(ops in prop::collection::vec(arb_op(), 1..300)) {
            let f = fx(6, 4);
            let p = f.ix.register();
            let mut m = Model { f, p, open: Vec::new(), sealed: Vec::new(), oracle: HashMap::new() };
            for op in ops {
                m.step(op);
            }
            for kn in 0..8u8 {
                m.step(Op::Lookup { key: kn });
            }
        }
    }

    // ---- multi-threaded stress ---------------------------------------------------

    fn pack(v: Version) -> u64 {
        (v.seq.0 << 20) | u64::from(v.index)
    }

    /// 4 writer threads install overlapping keys (and "write back" what they
    /// wrote), one reclaimer recycles old segments, 2 readers check that
    /// versions never go backwards and that data read from a slot whose
    /// `still_valid` holds is the data installed for that version.
    /// Seed: TIERCACHE_STRESS_SEED; duration: TIERCACHE_STRESS_MS (default 2000).
    #[test]
    fn stress_concurrent_install_lookup_reclaim() {
        let seed: u64 = std::env::var("TIERCACHE_STRESS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        });
        let ms: u64 = std::env::var("TIERCACHE_STRESS_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
        println!("stress seed {seed} (replay: TIERCACHE_STRESS_SEED={seed}), {ms} ms");
        const KEYS: u64 = 96;
        const SPS: u32 = 16;
        let ix = Arc::new(BlockIndex::new(40, SPS).unwrap());
        let mut r = ix.reclaimer().unwrap();
        let pool = Arc::new(Mutex::new(ix.take_unused(&mut r).unwrap()));
        // Simulated cache device: what was written to each slot.
        let data: Arc<Vec<AtomicU64>> = Arc::new((0..ix.nr_slots()).map(|_| AtomicU64::new(0)).collect());
        // Highest version ever installed per key.
        let floor: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new([(); 6].map(|_| AtomicUsize::new(0))); // installs, newer, lookups, hits, stale-retries, reclaims
        let deadline = Instant::now() + Duration::from_millis(ms);
        let mut handles = Vec::new();
        for w in 0..4u64 {
            let (ix, pool, data, floor, stop, stats) =
                (ix.clone(), pool.clone(), data.clone(), floor.clone(), stop.clone(), stats.clone());
            handles.push(std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((w + 1) * 0x9e37_79b9));
                let mut p = ix.register();
                while !stop.load(Relaxed) {
                    let fs = lock(&pool).pop();
                    let Some(fs) = fs else {
                        p.offline();
                        std::thread::sleep(Duration::from_micros(200));
                        p.online();
                        continue;
                    };
                    let o = ix.open_segment(fs).unwrap();
                    for i in 0..SPS {
                        let kn = rng.gen_range(0..KEYS);
                        let k = key(kn);
                        let kind = match rng.gen_range(0..10) {
                            0 => EntryKind::Tombstone,
                            1..=4 => EntryKind::Clean,
                            _ => EntryKind::Dirty,
                        };
                        let slot = ix.slot_id(o.id(), i);
                        let v = Version { seq: o.seq(), index: i };
                        data[slot.0 as usize].store(k.raw() ^ pack(v), Release);
                        match ix.install(&p, &o, i, k, kind) {
                            Ok(ins) => {
                                assert_eq!(ins.version, v);
                                floor[kn as usize].fetch_max(pack(v), SeqCst);
                                stats[0].fetch_add(1, Relaxed);
                            }
                            Err(InstallError::Newer { current }) => {
                                assert!(current > v);
                                stats[1].fetch_add(1, Relaxed);
                            }
                            Err(e) => panic!("{e:?}"),
                        }
                        if rng.gen_bool(0.3) {
                            p.quiescent();
                        }
                    }
                    let seg = ix.seal(o).unwrap();
                    // Write back.
                    for d in ix.dirty_slots(&p, seg).unwrap() {
                        ix.mark_clean(&p, d.slot, d.gen);
                    }
                    p.quiescent();
                }
            }));
        }
        for rd in 0..2u64 {
            let (ix, data, floor, stop, stats) = (ix.clone(), data.clone(), floor.clone(), stop.clone(), stats.clone());
            handles.push(std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (rd + 100));
                let mut p = ix.register();
                let mut seen = vec![0u64; KEYS as usize];
                while !stop.load(Relaxed) {
                    let kn = rng.gen_range(0..KEYS);
                    let k = key(kn);
                    let fl = floor[kn as usize].load(SeqCst);
                    stats[2].fetch_add(1, Relaxed);
                    if let Some(h) = ix.lookup(&p, k) {
                        let v = pack(h.version);
                        assert!(
                            v >= seen[kn as usize],
                            "seed {seed}: key {kn} went back from {} to {v}",
                            seen[kn as usize]
                        );
                        seen[kn as usize] = v;
                        stats[3].fetch_add(1, Relaxed);
                        // The "read" from the cache device may span quiescent states.
                        if rng.gen_bool(0.5) {
                            p.quiescent();
                            if rng.gen_bool(0.1) {
                                std::thread::yield_now();
                            }
                        }
                        let got = data[h.slot.0 as usize].load(Acquire);
                        if ix.still_valid(&h) {
                            assert_eq!(got, k.raw() ^ v, "seed {seed}: valid hit read foreign data");
                        } else {
                            stats[4].fetch_add(1, Relaxed);
                        }
                    }
                    if fl != 0 {
                        // Installed before this lookup started: a hit must be at least that new.
                        if let Some(h) = ix.lookup(&p, k) {
                            assert!(pack(h.version) >= fl, "seed {seed}: key {kn} older than installed floor");
                        }
                    }
                    p.quiescent();
                }
            }));
        }
        // Reclaimer on this thread.
        let mut reclaims = 0usize;
        while Instant::now() < deadline {
            let wm = ix.clean_watermark();
            let mut cands: Vec<(Seq, SegmentId)> = (0..ix.nr_segments())
                .map(SegmentId)
                .filter_map(|s| {
                    let i = ix.segment_info(s).unwrap();
                    (i.state == SegmentState::Sealed && i.dirty == 0 && i.seq <= wm).then_some((i.seq, s))
                })
                .collect();
            cands.sort();
            if cands.is_empty() {
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            for (_, s) in cands.into_iter().take(4) {
                let fs = ix.reclaim_segment(&mut r, s, wm, T).unwrap();
                lock(&pool).push(fs);
                reclaims += 1;
            }
        }
        stop.store(true, SeqCst);
        for h in handles {
            h.join().unwrap();
        }
        stats[5].store(reclaims, Relaxed);
        let s: Vec<usize> = stats.iter().map(|a| a.load(Relaxed)).collect();
        println!(
            "installs {} newer-rejected {} lookups {} hits {} recycled-retries {} reclaims {}",
            s[0], s[1], s[2], s[3], s[4], s[5]
        );
        assert!(s[0] > 1000 && s[2] > 1000 && s[3] > 100 && reclaims > 20, "too little work: {s:?}");
        // Final consistency: counters match a scan.
        let p = ix.register();
        for seg in 0..ix.nr_segments() {
            let info = ix.segment_info(SegmentId(seg)).unwrap();
            if info.state == SegmentState::Sealed {
                assert_eq!(info.dirty, 0);
                assert_eq!(ix.dirty_slots(&p, SegmentId(seg)).unwrap().len(), 0);
            }
        }
    }
}
