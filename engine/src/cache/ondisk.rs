//! The persisted format of a tiercache cache set.
//!
//! Everything that reaches a disk is described here: the cache device's
//! superblock (two alternating copies), the header written at offset 0 of each
//! backing device, and the log segments. Every persisted struct is named
//! `...OnDisk`, is `#[repr(C)]` with a compile-time size check, and is encoded
//! and decoded field by field, little-endian, to and from byte slices (no
//! transmutes). Decoding never repairs and never panics: anything read from a
//! device is checked and turned into a typed error.
//!
//! ```text
//! Cache device (byte offsets)
//! 0        4 KiB    8 KiB               64 KiB                1 MiB
//! +--------+--------+--------------------+---------------------+-----------+-----------+---
//! | SB  A  | SB  B  | zero (metadata     | reserved (zero,     | segment 0 | segment 1 | ...
//! | 640 B  | 640 B  |  region, unused)   |  future journal)    |  S bytes  |  S bytes  |
//! | +pad   | +pad   |                    |                     |           |           |
//! +--------+--------+--------------------+---------------------+-----------+-----------+---
//!  segment k starts at SEGMENTS_OFFSET (1 MiB) + k * S; S is a power of two,
//!  128 KiB ..= 4 MiB (default 512 KiB), so every segment is 128 KiB aligned.
//!
//! Log segment (S bytes, block size B = 512 or 4096)
//! +------------------------------------------------+--------+--------+-----+-----------+
//! | header blocks (H = ceil((512 + N*16) / B))      | slot 0 | slot 1 | ... | slot N-1  |
//! |  0..64     SegmentHeaderOnDisk                  |  B     |  B     |     |  B        |
//! |  64..512   zero                                 |        |        |     |           |
//! |  512..     BlockRecordOnDisk[0..n] (16 B each,  |        |        |     |           |
//! |            never straddling a 512 B sector)     |        |        |     |           |
//! +------------------------------------------------+--------+--------+-----+-----------+
//!  N = slots per segment = the largest N with H(N) + N <= S / B; record i <-> slot i.
//!  The header crc32c covers the header (crc zeroed) and the n valid records; every
//!  record carrying data holds the crc32c of its data block, so a torn segment write
//!  (header landed, some data did not) is detected and the whole segment is skipped.
//!
//! Backing device
//! 0                  data_offset (default 1 MiB)
//! +------------------+--------------------------------------------------------+
//! | BackingHeader    | cached volume data (cache-block LBA 0 starts here)     |
//! | 72 B + zero pad  |                                                        |
//! +------------------+--------------------------------------------------------+
//! ```
//!
//! The two superblock copies are written alternately; each carries `sb_seq`
//! and a crc32c. On load the valid copy with the highest `sb_seq` wins, so an
//! update interrupted half way (the copy being written is garbage) leaves the
//! other copy, one generation older, in force.

use std::fmt;
use std::mem::size_of;

use uuid::Uuid;

use super::index::{BackingIdx, Lba, SegmentId, Seq, SlotId};

/// Atomic unit of the devices we support; 16-byte records never straddle it.
pub const SECTOR_SIZE: usize = 512;
/// Current on-disk format version.
pub const FORMAT_VERSION: u32 = 1;
/// Superblock magic, `b"TIERC-SB"` read little-endian.
pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"TIERC-SB");
/// Log segment header magic, `b"TIERC-SG"`.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"TIERC-SG");
/// Backing-device header magic, `b"TIERC-BK"`.
pub const BACKING_MAGIC: u64 = u64::from_le_bytes(*b"TIERC-BK");
/// Byte offset of superblock copy A.
pub const SUPERBLOCK_A_OFFSET: u64 = 0;
/// Byte offset of superblock copy B.
pub const SUPERBLOCK_B_OFFSET: u64 = 4096;
/// Size of the area each superblock copy is written into (one 4 KiB block,
/// the encoded struct followed by zeroes).
pub const SUPERBLOCK_SLOT_SIZE: usize = 4096;
/// End of the superblock region.
pub const METADATA_REGION_SIZE: u64 = 64 * 1024;
/// Byte offset of segment 0 on the cache device.
pub const SEGMENTS_OFFSET: u64 = 1024 * 1024;
/// Smallest segment size.
pub const MIN_SEGMENT_SIZE: u32 = 128 * 1024;
/// Largest segment size.
pub const MAX_SEGMENT_SIZE: u32 = 4 * 1024 * 1024;
/// Default segment size.
pub const DEFAULT_SEGMENT_SIZE: u32 = 512 * 1024;
/// Maximum number of backing devices registered in one cache set.
pub const MAX_BACKING: usize = 16;
/// Default byte offset of the cached data on a backing device.
pub const DEFAULT_DATA_OFFSET: u64 = 1024 * 1024;
/// Byte offset of record 0 inside a segment (sector aligned).
pub const RECORDS_OFFSET: usize = SECTOR_SIZE;
/// Largest LBA + 1 (48 bits).
pub const LBA_LIMIT: u64 = 1 << 48;
/// Maximum number of slots in a cache set (slot ids are u32 and the index
/// stores `slot + 1`).
pub const MAX_SLOTS: u64 = u32::MAX as u64 - 1;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Which structure an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Structure {
    /// The cache device superblock.
    Superblock,
    /// The header at offset 0 of a backing device.
    BackingHeader,
}

/// A field that failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    BlockSize,
    SegmentSize,
    SegmentCount,
    SegmentsOffset,
    DeviceSize,
    Flags,
    BackingEntry(u8),
    BackingState,
    CacheMode,
    BackingIdx,
    DataOffset,
    DataSize,
    ReclaimSeq,
}

/// Errors from decoding or validating a superblock or a backing header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// The buffer is shorter than the encoded structure.
    Truncated { what: Structure, need: usize, got: usize },
    /// Not a tiercache cache device (superblock magic missing).
    NotACacheDevice,
    /// Not a tiercache backing device (backing header magic missing).
    NotABackingDevice,
    /// Written by a format version this code does not know.
    UnknownVersion { what: Structure, version: u32 },
    /// crc32c mismatch.
    Checksum { what: Structure, stored: u32, computed: u32 },
    /// A field holds an impossible value.
    InvalidField { what: Structure, field: Field, value: u64 },
    /// The superblock's block size is not what the caller expects.
    BlockSizeMismatch { expected: u32, found: u32 },
    /// The superblock's segment size is not what the caller expects.
    SegmentSizeMismatch { expected: u32, found: u32 },
    /// The device is smaller than the superblock says.
    DeviceTooSmall { superblock_says: u64, actual: u64 },
    /// Neither superblock copy is valid.
    BothSuperblocksCorrupt { a: Box<FormatError>, b: Box<FormatError> },
    /// The backing header belongs to another cache set.
    ForeignCacheSet { expected: Uuid, found: Uuid },
    /// The backing device's UUID is not registered in this cache set.
    UnknownBacking { backing: Uuid },
    /// The backing header's index disagrees with the superblock table.
    BackingIdxMismatch { backing: Uuid, superblock: u8, header: u8 },
    /// The backing device was retired from the cache set.
    BackingRetired { backing: Uuid },
    /// All 16 backing entries are used.
    BackingTableFull,
    /// The backing UUID is already registered.
    BackingAlreadyRegistered { backing: Uuid },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { what, need, got } => {
                write!(f, "{what:?}: need {need} bytes, got {got}")
            }
            Self::NotACacheDevice => write!(f, "not a tiercache cache device"),
            Self::NotABackingDevice => write!(f, "not a tiercache backing device"),
            Self::UnknownVersion { what, version } => {
                write!(f, "{what:?}: unknown format version {version}")
            }
            Self::Checksum { what, stored, computed } => {
                write!(f, "{what:?}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
            Self::InvalidField { what, field, value } => {
                write!(f, "{what:?}: invalid {field:?} = {value}")
            }
            Self::BlockSizeMismatch { expected, found } => {
                write!(f, "block size {found} on disk, expected {expected}")
            }
            Self::SegmentSizeMismatch { expected, found } => {
                write!(f, "segment size {found} on disk, expected {expected}")
            }
            Self::DeviceTooSmall { superblock_says, actual } => {
                write!(f, "device is {actual} bytes but the superblock says {superblock_says}")
            }
            Self::BothSuperblocksCorrupt { a, b } => {
                write!(f, "both superblock copies are corrupt (A: {a}; B: {b})")
            }
            Self::ForeignCacheSet { expected, found } => {
                write!(f, "backing device belongs to cache set {found}, not {expected}")
            }
            Self::UnknownBacking { backing } => {
                write!(f, "backing device {backing} is not registered in this cache set")
            }
            Self::BackingIdxMismatch { backing, superblock, header } => {
                write!(f, "backing device {backing}: index {header} in its header, {superblock} in the superblock")
            }
            Self::BackingRetired { backing } => write!(f, "backing device {backing} is retired"),
            Self::BackingTableFull => write!(f, "backing device table is full"),
            Self::BackingAlreadyRegistered { backing } => {
                write!(f, "backing device {backing} is already registered")
            }
        }
    }
}

impl std::error::Error for FormatError {}

/// Why a log segment is not usable. Every variant means the same thing to
/// recovery — skip the whole segment — but they are kept apart for logging
/// and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentError {
    /// A buffer is shorter than the geometry requires.
    Truncated { need: usize, got: usize },
    /// No segment header magic: never written (or zeroed).
    NoMagic,
    /// Header crc32c mismatch: the header write was torn, or never happened.
    HeaderChecksum { stored: u32, computed: u32 },
    /// Segment written by another cache set (stale after a re-format).
    ForeignCacheSet { found: Uuid },
    /// The header says it belongs at another segment index.
    Misplaced { expected: SegmentId, found: u32 },
    /// The header's block size is not the cache set's.
    BlockSizeMismatch { expected: u32, found: u32 },
    /// More records than the segment has slots.
    TooManyRecords { n: u32, max: u32 },
    /// A record with an impossible flag combination or field.
    BadRecord { index: u32, raw_flags: u8 },
    /// A record's data block does not match its crc32c: the data write was
    /// torn. The caller must skip the whole segment.
    TornData { record: u32, stored: u32, computed: u32 },
}

impl SegmentError {
    /// `true` when the segment was simply never (completely) written: no magic
    /// or a bad header checksum. Other errors hint at a bug or a foreign
    /// writer and deserve a louder log line.
    pub fn is_unwritten(&self) -> bool {
        matches!(self, Self::NoMagic | Self::HeaderChecksum { .. })
    }
}

impl fmt::Display for SegmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid log segment: {self:?}")
    }
}

impl std::error::Error for SegmentError {}

// ---------------------------------------------------------------------------
// Little-endian cursors
// ---------------------------------------------------------------------------

/// Writes fields little-endian into a fixed buffer we own. The structures
/// are laid out so the cursor ends exactly at the buffer's end (checked by
/// debug assertions and tests).
struct Put<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Put<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn bytes(&mut self, v: &[u8]) {
        if let Some(dst) = self.buf.get_mut(self.pos..self.pos + v.len()) {
            dst.copy_from_slice(v);
        }
        self.pos += v.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// Reads fields little-endian; out-of-range reads yield zeroes instead of
/// panicking (callers check the length first, so that never happens).
struct Get<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Get<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn arr<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.buf.get(self.pos..self.pos + N) {
            out.copy_from_slice(src);
        }
        self.pos += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.arr::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.arr())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.arr())
    }
}

fn take<const N: usize>(bytes: &[u8]) -> Option<&[u8; N]> {
    bytes.get(..N).and_then(|s| s.try_into().ok())
}

// ---------------------------------------------------------------------------
// Enums stored as u8
// ---------------------------------------------------------------------------

/// State of a backing-device entry in the superblock table.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingState {
    /// Unused table entry.
    #[default]
    Free = 0,
    /// Registered and cached.
    Attached = 1,
    /// Registered but not cached right now (I/O goes straight to it).
    Detached = 2,
    /// Permanently removed; its index is not reused.
    Retired = 3,
}

impl BackingState {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Free,
            1 => Self::Attached,
            2 => Self::Detached,
            3 => Self::Retired,
            _ => return None,
        })
    }
}

/// Cache mode of a backing device.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    #[default]
    WriteBack = 0,
    WriteThrough = 1,
    WriteAround = 2,
    /// Caching disabled; the entry stays registered.
    None = 3,
}

impl CacheMode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::WriteBack,
            1 => Self::WriteThrough,
            2 => Self::WriteAround,
            3 => Self::None,
            _ => return None,
        })
    }
}

/// State recorded in a backing device's own header.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingHeaderState {
    /// The device holds the newest data for every block.
    Clean = 0,
    /// The cache set may hold data newer than this device.
    Dirty = 1,
}

// ---------------------------------------------------------------------------
// Superblock
// ---------------------------------------------------------------------------

/// One entry of the backing-device table in the superblock. Entry `i` always
/// describes backing index `i`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackingEntryOnDisk {
    pub backing_uuid: [u8; 16],
    /// Size of the cached data area, in cache blocks.
    pub data_blocks: u64,
    pub backing_idx: u8,
    pub state: BackingState,
    pub cache_mode: CacheMode,
    pub reserved: [u8; 5],
}

const _: () = assert!(size_of::<BackingEntryOnDisk>() == BackingEntryOnDisk::SIZE);

impl BackingEntryOnDisk {
    pub const SIZE: usize = 32;

    fn put(&self, p: &mut Put<'_>) {
        p.bytes(&self.backing_uuid);
        p.u64(self.data_blocks);
        p.u8(self.backing_idx);
        p.u8(self.state as u8);
        p.u8(self.cache_mode as u8);
        p.bytes(&self.reserved);
    }

    fn get(g: &mut Get<'_>, pos: u8) -> Result<Self, FormatError> {
        let bad = |field, value| FormatError::InvalidField { what: Structure::Superblock, field, value };
        let backing_uuid = g.arr();
        let data_blocks = g.u64();
        let backing_idx = g.u8();
        let raw_state = g.u8();
        let raw_mode = g.u8();
        let reserved = g.arr();
        let state = BackingState::from_u8(raw_state).ok_or(bad(Field::BackingState, raw_state.into()))?;
        let cache_mode = CacheMode::from_u8(raw_mode).ok_or(bad(Field::CacheMode, raw_mode.into()))?;
        if state != BackingState::Free && backing_idx != pos {
            return Err(bad(Field::BackingEntry(pos), backing_idx.into()));
        }
        Ok(Self { backing_uuid, data_blocks, backing_idx, state, cache_mode, reserved })
    }

    /// The backing device's UUID.
    pub fn uuid(&self) -> Uuid {
        Uuid::from_bytes(self.backing_uuid)
    }
}

/// The cache device superblock. Written as copy A (offset 0) or B (offset
/// 4096), alternately, each padded with zeroes to 4 KiB.
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperblockOnDisk {
    pub magic: u64,
    pub version: u32,
    /// crc32c of the encoded struct with this field zeroed. `encode` always
    /// writes a freshly computed value; `decode` fills in what it read.
    pub crc: u32,
    /// Generation of this copy; the valid copy with the highest wins.
    pub sb_seq: u64,
    /// Every log segment with seq <= this has been written back: recovery
    /// replays their records as clean (see `docs/on-disk-format.md`).
    pub writeback_seq: u64,
    pub cache_set_uuid: [u8; 16],
    pub block_size: u32,
    pub segment_size: u32,
    pub nr_segments: u32,
    /// Feature flags; none defined, must be zero.
    pub flags: u32,
    /// Size of the cache device when formatted, in bytes.
    pub device_size: u64,
    /// Byte offset of segment 0 (always `SEGMENTS_OFFSET` in version 1).
    pub segments_offset: u64,
    /// Every log segment with seq <= this was reclaimed (its position may have been
    /// reused): recovery ignores such segments. Always <= `writeback_seq`.
    pub reclaim_seq: u64,
    pub reserved: [u8; 40],
    pub backing: [BackingEntryOnDisk; MAX_BACKING],
}

const _: () = assert!(size_of::<SuperblockOnDisk>() == SuperblockOnDisk::SIZE);
const _: () = assert!(SuperblockOnDisk::SIZE <= SUPERBLOCK_SLOT_SIZE);

/// Parameters for [`format_superblock`].
#[derive(Debug, Clone, Copy)]
pub struct FormatParams {
    pub cache_set: Uuid,
    pub block_size: u32,
    pub segment_size: u32,
    pub device_size: u64,
}

/// What the caller expects of a superblock it loads.
#[derive(Debug, Clone, Copy)]
pub struct SuperblockExpect {
    pub block_size: Option<u32>,
    pub segment_size: Option<u32>,
    /// Actual size of the device in bytes.
    pub device_size: u64,
}

/// Builds a fresh superblock for an empty cache set (`sb_seq` 1,
/// `writeback_seq` 0, no backing devices). Write it to BOTH copies. The
/// number of segments is as many as fit after `SEGMENTS_OFFSET`.
pub fn format_superblock(p: FormatParams) -> Result<SuperblockOnDisk, FormatError> {
    let geom = SegmentGeometry::new(p.block_size, p.segment_size)?;
    let nr = p.device_size.saturating_sub(SEGMENTS_OFFSET) / u64::from(p.segment_size);
    let nr_segments = u32::try_from(nr).unwrap_or(u32::MAX);
    let mut nr_segments = nr_segments;
    while nr_segments > 0 && u64::from(nr_segments) * u64::from(geom.slots_per_segment()) > MAX_SLOTS {
        nr_segments -= 1;
    }
    let sb = SuperblockOnDisk {
        magic: SUPERBLOCK_MAGIC,
        version: FORMAT_VERSION,
        crc: 0,
        sb_seq: 1,
        writeback_seq: 0,
        cache_set_uuid: *p.cache_set.as_bytes(),
        block_size: p.block_size,
        segment_size: p.segment_size,
        nr_segments,
        flags: 0,
        device_size: p.device_size,
        segments_offset: SEGMENTS_OFFSET,
        reclaim_seq: 0,
        reserved: [0; 40],
        backing: [BackingEntryOnDisk::default(); MAX_BACKING],
    };
    sb.validate()?;
    let crc = sb.compute_crc();
    Ok(SuperblockOnDisk { crc, ..sb })
}

impl SuperblockOnDisk {
    pub const SIZE: usize = 640;
    const CRC_RANGE: std::ops::Range<usize> = 12..16;

    fn encode_with_crc(&self, crc: u32) -> [u8; Self::SIZE] {
        let mut buf = [0u8; Self::SIZE];
        let mut p = Put::new(&mut buf);
        p.u64(self.magic);
        p.u32(self.version);
        p.u32(crc);
        p.u64(self.sb_seq);
        p.u64(self.writeback_seq);
        p.bytes(&self.cache_set_uuid);
        p.u32(self.block_size);
        p.u32(self.segment_size);
        p.u32(self.nr_segments);
        p.u32(self.flags);
        p.u64(self.device_size);
        p.u64(self.segments_offset);
        p.u64(self.reclaim_seq);
        p.bytes(&self.reserved);
        for e in &self.backing {
            e.put(&mut p);
        }
        debug_assert_eq!(p.pos, Self::SIZE);
        buf
    }

    /// crc32c of the encoding with the crc field zeroed.
    pub fn compute_crc(&self) -> u32 {
        crc32c::crc32c(&self.encode_with_crc(0))
    }

    /// Encodes with a freshly computed crc.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        self.encode_with_crc(self.compute_crc())
    }

    /// Encodes into a full 4 KiB superblock slot (zero padded).
    pub fn encode_slot(&self) -> Vec<u8> {
        let mut v = vec![0u8; SUPERBLOCK_SLOT_SIZE];
        v[..Self::SIZE].copy_from_slice(&self.encode());
        v
    }

    /// Decodes and validates one copy: magic, crc, version, then every field.
    /// Caller expectations are checked separately ([`Self::check_expect`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let raw: &[u8; Self::SIZE] = take(bytes).ok_or(FormatError::Truncated {
            what: Structure::Superblock,
            need: Self::SIZE,
            got: bytes.len(),
        })?;
        let mut g = Get::new(raw);
        let magic = g.u64();
        if magic != SUPERBLOCK_MAGIC {
            return Err(FormatError::NotACacheDevice);
        }
        let version = g.u32();
        let crc = g.u32();
        let mut zeroed = *raw;
        zeroed[Self::CRC_RANGE].fill(0);
        let computed = crc32c::crc32c(&zeroed);
        if computed != crc {
            return Err(FormatError::Checksum { what: Structure::Superblock, stored: crc, computed });
        }
        if version != FORMAT_VERSION {
            return Err(FormatError::UnknownVersion { what: Structure::Superblock, version });
        }
        let mut sb = SuperblockOnDisk {
            magic,
            version,
            crc,
            sb_seq: g.u64(),
            writeback_seq: g.u64(),
            cache_set_uuid: g.arr(),
            block_size: g.u32(),
            segment_size: g.u32(),
            nr_segments: g.u32(),
            flags: g.u32(),
            device_size: g.u64(),
            segments_offset: g.u64(),
            reclaim_seq: g.u64(),
            reserved: g.arr(),
            backing: [BackingEntryOnDisk::default(); MAX_BACKING],
        };
        for (i, e) in sb.backing.iter_mut().enumerate() {
            *e = BackingEntryOnDisk::get(&mut g, i as u8)?;
        }
        debug_assert_eq!(g.pos, Self::SIZE);
        sb.validate()?;
        Ok(sb)
    }

    /// Structural validation shared by `format_superblock` and `decode`.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |field, value: u64| FormatError::InvalidField { what: Structure::Superblock, field, value };
        let geom = SegmentGeometry::new(self.block_size, self.segment_size)?;
        if self.flags != 0 {
            return Err(bad(Field::Flags, self.flags.into()));
        }
        if self.segments_offset != SEGMENTS_OFFSET {
            return Err(bad(Field::SegmentsOffset, self.segments_offset));
        }
        if self.reclaim_seq > self.writeback_seq {
            return Err(bad(Field::ReclaimSeq, self.reclaim_seq));
        }
        if self.nr_segments < 2 {
            return Err(bad(Field::SegmentCount, self.nr_segments.into()));
        }
        if u64::from(self.nr_segments) * u64::from(geom.slots_per_segment()) > MAX_SLOTS {
            return Err(bad(Field::SegmentCount, self.nr_segments.into()));
        }
        let end = SEGMENTS_OFFSET + u64::from(self.nr_segments) * u64::from(self.segment_size);
        if end > self.device_size {
            return Err(bad(Field::DeviceSize, self.device_size));
        }
        let mut seen: Vec<[u8; 16]> = Vec::new();
        for (i, e) in self.backing.iter().enumerate() {
            if e.state == BackingState::Free {
                if *e != BackingEntryOnDisk::default() {
                    return Err(bad(Field::BackingEntry(i as u8), 0));
                }
                continue;
            }
            if e.backing_idx as usize != i
                || e.backing_uuid == [0; 16]
                || e.data_blocks > LBA_LIMIT
                || seen.contains(&e.backing_uuid)
            {
                return Err(bad(Field::BackingEntry(i as u8), e.backing_idx.into()));
            }
            seen.push(e.backing_uuid);
        }
        Ok(())
    }

    /// Checks block size, segment size and device size against the caller.
    pub fn check_expect(&self, x: &SuperblockExpect) -> Result<(), FormatError> {
        if let Some(bs) = x.block_size {
            if bs != self.block_size {
                return Err(FormatError::BlockSizeMismatch { expected: bs, found: self.block_size });
            }
        }
        if let Some(ss) = x.segment_size {
            if ss != self.segment_size {
                return Err(FormatError::SegmentSizeMismatch { expected: ss, found: self.segment_size });
            }
        }
        if x.device_size < self.device_size {
            return Err(FormatError::DeviceTooSmall { superblock_says: self.device_size, actual: x.device_size });
        }
        Ok(())
    }

    /// The cache set's UUID.
    pub fn cache_set(&self) -> Uuid {
        Uuid::from_bytes(self.cache_set_uuid)
    }

    /// Segment geometry (valid: checked at decode/format).
    pub fn geometry(&self) -> Result<SegmentGeometry, FormatError> {
        SegmentGeometry::new(self.block_size, self.segment_size)
    }

    /// Total number of data slots in the cache set.
    pub fn total_slots(&self) -> Result<u32, FormatError> {
        let g = self.geometry()?;
        let n = u64::from(self.nr_segments) * u64::from(g.slots_per_segment());
        u32::try_from(n).map_err(|_| FormatError::InvalidField {
            what: Structure::Superblock,
            field: Field::SegmentCount,
            value: self.nr_segments.into(),
        })
    }

    /// Finds a registered (non-free) backing entry by UUID.
    pub fn find_backing(&self, backing: Uuid) -> Option<&BackingEntryOnDisk> {
        self.backing.iter().find(|e| e.state != BackingState::Free && e.backing_uuid == *backing.as_bytes())
    }

    /// Registers a new backing device in the first free entry and returns
    /// its index. Retired entries are never reused (old log records may still
    /// name their index until the log wraps).
    pub fn register_backing(
        &mut self,
        backing: Uuid,
        data_blocks: u64,
        mode: CacheMode,
    ) -> Result<BackingIdx, FormatError> {
        if self.find_backing(backing).is_some() {
            return Err(FormatError::BackingAlreadyRegistered { backing });
        }
        if backing.is_nil() {
            return Err(FormatError::InvalidField {
                what: Structure::Superblock,
                field: Field::BackingEntry(0),
                value: 0,
            });
        }
        if data_blocks > LBA_LIMIT {
            return Err(FormatError::InvalidField {
                what: Structure::Superblock,
                field: Field::DataSize,
                value: data_blocks,
            });
        }
        let (i, e) = self
            .backing
            .iter_mut()
            .enumerate()
            .find(|(_, e)| e.state == BackingState::Free)
            .ok_or(FormatError::BackingTableFull)?;
        *e = BackingEntryOnDisk {
            backing_uuid: *backing.as_bytes(),
            data_blocks,
            backing_idx: i as u8,
            state: BackingState::Attached,
            cache_mode: mode,
            reserved: [0; 5],
        };
        Ok(BackingIdx(i as u8))
    }

    /// Re-attaches a backing device found on some device node (in any order)
    /// to its table entry by UUID. Returns the index its records use.
    pub fn attach_backing(&self, header: &BackingHeaderOnDisk) -> Result<BackingIdx, FormatError> {
        if header.cache_set_uuid != self.cache_set_uuid {
            return Err(FormatError::ForeignCacheSet { expected: self.cache_set(), found: header.cache_set() });
        }
        let backing = header.backing();
        let e = self.find_backing(backing).ok_or(FormatError::UnknownBacking { backing })?;
        if e.backing_idx != header.backing_idx {
            return Err(FormatError::BackingIdxMismatch {
                backing,
                superblock: e.backing_idx,
                header: header.backing_idx,
            });
        }
        if e.state == BackingState::Retired {
            return Err(FormatError::BackingRetired { backing });
        }
        Ok(BackingIdx(e.backing_idx))
    }
}

/// Which of the two superblock copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperblockCopy {
    A,
    B,
}

impl SuperblockCopy {
    /// Byte offset on the cache device.
    pub fn offset(self) -> u64 {
        match self {
            Self::A => SUPERBLOCK_A_OFFSET,
            Self::B => SUPERBLOCK_B_OFFSET,
        }
    }
    /// The other copy.
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

/// The superblock in force and the copy it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedSuperblock {
    pub sb: SuperblockOnDisk,
    pub from: SuperblockCopy,
    /// Why the other copy lost, if it was invalid (for logging).
    pub other_error: Option<FormatError>,
}

/// A superblock update to be written to `target`; apply it with
/// [`LoadedSuperblock::complete_update`] once the write (and flush) is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSuperblockWrite {
    pub target: SuperblockCopy,
    pub sb: SuperblockOnDisk,
}

impl PendingSuperblockWrite {
    /// The 4 KiB to write at `target.offset()`.
    pub fn bytes(&self) -> Vec<u8> {
        self.sb.encode_slot()
    }
}

impl LoadedSuperblock {
    /// The state after a fresh format (both copies written with the same
    /// content; ties go to A, so the first update goes to B).
    pub fn formatted(sb: SuperblockOnDisk) -> Self {
        Self { sb, from: SuperblockCopy::A, other_error: None }
    }

    /// Prepares the next generation: `edit` changes a copy of the current
    /// superblock, which gets `sb_seq + 1` and is aimed at the copy that is
    /// NOT in force, so an interrupted write leaves the current one valid.
    pub fn begin_update(
        &self,
        edit: impl FnOnce(&mut SuperblockOnDisk),
    ) -> Result<PendingSuperblockWrite, FormatError> {
        let mut sb = self.sb.clone();
        edit(&mut sb);
        sb.sb_seq = self.sb.sb_seq + 1;
        sb.validate()?;
        sb.crc = sb.compute_crc();
        Ok(PendingSuperblockWrite { target: self.from.other(), sb })
    }

    /// Records that `w` is durable.
    pub fn complete_update(&mut self, w: PendingSuperblockWrite) {
        self.sb = w.sb;
        self.from = w.target;
        self.other_error = None;
    }
}

/// Picks the superblock in force from the two copies (each at least
/// `SuperblockOnDisk::SIZE` bytes) and checks it against `expect`.
///
/// * both copies valid → the higher `sb_seq` (tie → A);
/// * one valid → that one, unless the other is a valid copy of an unknown
///   (newer) version, which is reported rather than silently rolled back;
/// * neither has the magic → `NotACacheDevice`;
/// * otherwise → `BothSuperblocksCorrupt`.
pub fn load_superblock(
    copy_a: &[u8],
    copy_b: &[u8],
    expect: &SuperblockExpect,
) -> Result<LoadedSuperblock, FormatError> {
    let a = SuperblockOnDisk::decode(copy_a);
    let b = SuperblockOnDisk::decode(copy_b);
    for r in [&a, &b] {
        if let Err(e @ FormatError::UnknownVersion { .. }) = r {
            return Err(e.clone());
        }
    }
    let loaded = match (a, b) {
        (Ok(a), Ok(b)) => {
            if b.sb_seq > a.sb_seq {
                LoadedSuperblock { sb: b, from: SuperblockCopy::B, other_error: None }
            } else {
                LoadedSuperblock { sb: a, from: SuperblockCopy::A, other_error: None }
            }
        }
        (Ok(a), Err(e)) => LoadedSuperblock { sb: a, from: SuperblockCopy::A, other_error: Some(e) },
        (Err(e), Ok(b)) => LoadedSuperblock { sb: b, from: SuperblockCopy::B, other_error: Some(e) },
        (Err(FormatError::NotACacheDevice), Err(FormatError::NotACacheDevice)) => {
            return Err(FormatError::NotACacheDevice)
        }
        (Err(a), Err(b)) => return Err(FormatError::BothSuperblocksCorrupt { a: Box::new(a), b: Box::new(b) }),
    };
    loaded.sb.check_expect(expect)?;
    Ok(loaded)
}

// ---------------------------------------------------------------------------
// Backing header
// ---------------------------------------------------------------------------

/// Header at offset 0 of every backing device.
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingHeaderOnDisk {
    pub magic: u64,
    pub version: u32,
    pub crc: u32,
    pub backing_uuid: [u8; 16],
    pub cache_set_uuid: [u8; 16],
    /// Byte offset of the cached volume's data (cache-block LBA 0).
    pub data_offset: u64,
    /// Size of the data area in bytes.
    pub data_size: u64,
    pub backing_idx: u8,
    pub state: BackingHeaderState,
    pub reserved: [u8; 6],
}

const _: () = assert!(size_of::<BackingHeaderOnDisk>() == BackingHeaderOnDisk::SIZE);

impl BackingHeaderOnDisk {
    pub const SIZE: usize = 72;
    const CRC_RANGE: std::ops::Range<usize> = 12..16;

    /// A fresh header for a device registered as `idx` in `cache_set`.
    pub fn new(
        backing: Uuid,
        cache_set: Uuid,
        idx: BackingIdx,
        data_offset: u64,
        data_size: u64,
    ) -> Result<Self, FormatError> {
        let h = Self {
            magic: BACKING_MAGIC,
            version: FORMAT_VERSION,
            crc: 0,
            backing_uuid: *backing.as_bytes(),
            cache_set_uuid: *cache_set.as_bytes(),
            data_offset,
            data_size,
            backing_idx: idx.0,
            state: BackingHeaderState::Clean,
            reserved: [0; 6],
        };
        h.validate()?;
        Ok(h)
    }

    fn encode_with_crc(&self, crc: u32) -> [u8; Self::SIZE] {
        let mut buf = [0u8; Self::SIZE];
        let mut p = Put::new(&mut buf);
        p.u64(self.magic);
        p.u32(self.version);
        p.u32(crc);
        p.bytes(&self.backing_uuid);
        p.bytes(&self.cache_set_uuid);
        p.u64(self.data_offset);
        p.u64(self.data_size);
        p.u8(self.backing_idx);
        p.u8(self.state as u8);
        p.bytes(&self.reserved);
        debug_assert_eq!(p.pos, Self::SIZE);
        buf
    }

    /// Encodes with a freshly computed crc32c.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let crc = crc32c::crc32c(&self.encode_with_crc(0));
        self.encode_with_crc(crc)
    }

    /// Decodes and validates a header; does not check which set it belongs to.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let raw: &[u8; Self::SIZE] = take(bytes).ok_or(FormatError::Truncated {
            what: Structure::BackingHeader,
            need: Self::SIZE,
            got: bytes.len(),
        })?;
        let mut g = Get::new(raw);
        let magic = g.u64();
        if magic != BACKING_MAGIC {
            return Err(FormatError::NotABackingDevice);
        }
        let version = g.u32();
        let crc = g.u32();
        let mut zeroed = *raw;
        zeroed[Self::CRC_RANGE].fill(0);
        let computed = crc32c::crc32c(&zeroed);
        if computed != crc {
            return Err(FormatError::Checksum { what: Structure::BackingHeader, stored: crc, computed });
        }
        if version != FORMAT_VERSION {
            return Err(FormatError::UnknownVersion { what: Structure::BackingHeader, version });
        }
        let backing_uuid = g.arr();
        let cache_set_uuid = g.arr();
        let data_offset = g.u64();
        let data_size = g.u64();
        let backing_idx = g.u8();
        let raw_state = g.u8();
        let reserved = g.arr();
        let state = match raw_state {
            0 => BackingHeaderState::Clean,
            1 => BackingHeaderState::Dirty,
            v => {
                return Err(FormatError::InvalidField {
                    what: Structure::BackingHeader,
                    field: Field::BackingState,
                    value: v.into(),
                })
            }
        };
        let h = Self {
            magic,
            version,
            crc,
            backing_uuid,
            cache_set_uuid,
            data_offset,
            data_size,
            backing_idx,
            state,
            reserved,
        };
        h.validate()?;
        Ok(h)
    }

    /// Decodes and checks that the header belongs to `cache_set`.
    pub fn decode_for_set(bytes: &[u8], cache_set: Uuid) -> Result<Self, FormatError> {
        let h = Self::decode(bytes)?;
        if h.cache_set() != cache_set {
            return Err(FormatError::ForeignCacheSet { expected: cache_set, found: h.cache_set() });
        }
        Ok(h)
    }

    fn validate(&self) -> Result<(), FormatError> {
        let bad = |field, value| FormatError::InvalidField { what: Structure::BackingHeader, field, value };
        if self.data_offset < Self::SIZE as u64 || self.data_offset & (SECTOR_SIZE as u64 - 1) != 0 {
            return Err(bad(Field::DataOffset, self.data_offset));
        }
        if self.backing_idx as usize >= MAX_BACKING {
            return Err(bad(Field::BackingIdx, self.backing_idx.into()));
        }
        if self.backing_uuid == [0; 16] {
            return Err(bad(Field::BackingEntry(self.backing_idx), 0));
        }
        Ok(())
    }

    pub fn backing(&self) -> Uuid {
        Uuid::from_bytes(self.backing_uuid)
    }

    pub fn cache_set(&self) -> Uuid {
        Uuid::from_bytes(self.cache_set_uuid)
    }
}

// ---------------------------------------------------------------------------
// Segment geometry
// ---------------------------------------------------------------------------

/// Layout math for log segments of one cache set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentGeometry {
    block_size: u32,
    segment_size: u32,
    header_blocks: u32,
    slots_per_segment: u32,
}

impl SegmentGeometry {
    /// Validates the sizes and computes the layout.
    pub fn new(block_size: u32, segment_size: u32) -> Result<Self, FormatError> {
        if block_size != 512 && block_size != 4096 {
            return Err(FormatError::InvalidField {
                what: Structure::Superblock,
                field: Field::BlockSize,
                value: block_size.into(),
            });
        }
        if !segment_size.is_power_of_two() || !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size) {
            return Err(FormatError::InvalidField {
                what: Structure::Superblock,
                field: Field::SegmentSize,
                value: segment_size.into(),
            });
        }
        let blocks = segment_size / block_size;
        let mut n = blocks - 1;
        while n > 0 && Self::header_blocks_for(block_size, n) + n > blocks {
            n -= 1;
        }
        Ok(Self {
            block_size,
            segment_size,
            header_blocks: Self::header_blocks_for(block_size, n),
            slots_per_segment: n,
        })
    }

    fn header_blocks_for(block_size: u32, records: u32) -> u32 {
        let bytes = RECORDS_OFFSET as u64 + u64::from(records) * BlockRecordOnDisk::SIZE as u64;
        bytes.div_ceil(u64::from(block_size)) as u32
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }
    /// Blocks at the start of each segment holding the header and records.
    pub fn header_blocks(&self) -> u32 {
        self.header_blocks
    }
    /// Data slots (and so maximum records) per segment.
    pub fn slots_per_segment(&self) -> u32 {
        self.slots_per_segment
    }
    /// Bytes of the header region (header + record array + padding).
    pub fn header_bytes(&self) -> usize {
        self.header_blocks as usize * self.block_size as usize
    }
    /// Bytes of the data region (all slots).
    pub fn data_bytes(&self) -> usize {
        self.slots_per_segment as usize * self.block_size as usize
    }
    /// Byte offset of segment `k` on the cache device.
    pub fn segment_offset(&self, k: SegmentId) -> u64 {
        SEGMENTS_OFFSET + u64::from(k.0) * u64::from(self.segment_size)
    }
    /// Byte offset of data slot `i` of segment `k` on the cache device.
    pub fn slot_offset(&self, k: SegmentId, i: u32) -> u64 {
        debug_assert!(i < self.slots_per_segment);
        self.segment_offset(k) + u64::from(self.header_blocks + i) * u64::from(self.block_size)
    }
    /// Byte offset of a slot.
    pub fn slot_id_offset(&self, slot: SlotId) -> u64 {
        let (k, i) = self.slot_location(slot);
        self.slot_offset(k, i)
    }
    /// Byte offset of record `i` inside the segment.
    pub fn record_offset(&self, i: u32) -> usize {
        RECORDS_OFFSET + i as usize * BlockRecordOnDisk::SIZE
    }
    /// Slot id of (segment, index).
    pub fn slot_id(&self, k: SegmentId, i: u32) -> SlotId {
        debug_assert!(i < self.slots_per_segment);
        SlotId(k.0 * self.slots_per_segment + i)
    }
    /// (segment, index) of a slot id.
    pub fn slot_location(&self, slot: SlotId) -> (SegmentId, u32) {
        (SegmentId(slot.0 / self.slots_per_segment), slot.0 % self.slots_per_segment)
    }
}

// ---------------------------------------------------------------------------
// Segment header and records
// ---------------------------------------------------------------------------

/// Record flags.
pub mod record_flags {
    /// Newer than the backing device; must be written back.
    pub const DIRTY: u8 = 1 << 0;
    /// Same as the backing device (promoted or written-through copy).
    pub const CLEAN: u8 = 1 << 1;
    /// Invalidates any older copy of the block; carries no data.
    pub const TOMBSTONE: u8 = 1 << 2;
    /// The block reads as zeroes; carries no data. Combined with DIRTY or CLEAN.
    pub const ZERO: u8 = 1 << 3;
    /// All defined bits.
    pub const ALL: u8 = DIRTY | CLEAN | TOMBSTONE | ZERO;
}

/// One 16-byte log record describing data slot `i` of its segment.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockRecordOnDisk {
    /// Cache-block LBA on the backing device's data area, 48 bits LE.
    pub lba: [u8; 6],
    pub backing_idx: u8,
    pub flags: u8,
    /// crc32c of the data block (0 when the record carries no data).
    pub data_crc: u32,
    pub reserved: u32,
}

const _: () = assert!(size_of::<BlockRecordOnDisk>() == BlockRecordOnDisk::SIZE);
// 16-byte records packed from a 512-aligned offset never straddle a sector.
const _: () = assert!(SECTOR_SIZE / BlockRecordOnDisk::SIZE * BlockRecordOnDisk::SIZE == SECTOR_SIZE);
const _: () = assert!(RECORDS_OFFSET / SECTOR_SIZE * SECTOR_SIZE == RECORDS_OFFSET);
const _: () = assert!(SegmentHeaderOnDisk::SIZE <= RECORDS_OFFSET);

impl BlockRecordOnDisk {
    pub const SIZE: usize = 16;

    /// A record for a block carrying `data` (crc computed here).
    pub fn with_data(lba: Lba, idx: BackingIdx, flags: u8, data: &[u8]) -> Self {
        Self::raw(lba, idx, flags, crc32c::crc32c(data))
    }

    /// A record that carries no data (TOMBSTONE, or ZERO with DIRTY/CLEAN).
    pub fn without_data(lba: Lba, idx: BackingIdx, flags: u8) -> Self {
        Self::raw(lba, idx, flags, 0)
    }

    fn raw(lba: Lba, idx: BackingIdx, flags: u8, data_crc: u32) -> Self {
        let b = lba.0.to_le_bytes();
        Self { lba: [b[0], b[1], b[2], b[3], b[4], b[5]], backing_idx: idx.0, flags, data_crc, reserved: 0 }
    }

    pub fn lba(&self) -> Lba {
        let l = &self.lba;
        Lba(u64::from_le_bytes([l[0], l[1], l[2], l[3], l[4], l[5], 0, 0]))
    }

    pub fn backing(&self) -> BackingIdx {
        BackingIdx(self.backing_idx)
    }

    /// Whether data slot `i` holds this record's data.
    pub fn carries_data(&self) -> bool {
        self.flags & (record_flags::TOMBSTONE | record_flags::ZERO) == 0
    }

    /// Flag combination and field check.
    pub fn is_valid(&self) -> bool {
        use record_flags::*;
        let f = self.flags;
        let kind = f & (DIRTY | CLEAN | TOMBSTONE);
        f & !ALL == 0
            && kind.count_ones() == 1
            && !(f & ZERO != 0 && kind == TOMBSTONE)
            && (self.backing_idx as usize) < MAX_BACKING
            && self.reserved == 0
            && (self.carries_data() || self.data_crc == 0)
    }

    fn put(&self, p: &mut Put<'_>) {
        p.bytes(&self.lba);
        p.u8(self.backing_idx);
        p.u8(self.flags);
        p.u32(self.data_crc);
        p.u32(self.reserved);
    }

    fn get(g: &mut Get<'_>) -> Self {
        Self { lba: g.arr(), backing_idx: g.u8(), flags: g.u8(), data_crc: g.u32(), reserved: g.u32() }
    }
}

/// Header in the first sector of every log segment.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeaderOnDisk {
    pub magic: u64,
    /// Monotonic across the cache set; the version of every record here.
    pub seq: u64,
    /// Guards against replaying a stale segment after a re-format.
    pub cache_set_uuid: [u8; 16],
    pub segment_index: u32,
    pub nr_records: u32,
    /// crc32c over this header (crc zeroed) followed by the n records.
    pub crc: u32,
    pub block_size: u32,
    pub reserved: [u8; 16],
}

const _: () = assert!(size_of::<SegmentHeaderOnDisk>() == SegmentHeaderOnDisk::SIZE);

impl SegmentHeaderOnDisk {
    pub const SIZE: usize = 64;

    fn encode_with_crc(&self, crc: u32) -> [u8; Self::SIZE] {
        let mut buf = [0u8; Self::SIZE];
        let mut p = Put::new(&mut buf);
        p.u64(self.magic);
        p.u64(self.seq);
        p.bytes(&self.cache_set_uuid);
        p.u32(self.segment_index);
        p.u32(self.nr_records);
        p.u32(crc);
        p.u32(self.block_size);
        p.bytes(&self.reserved);
        debug_assert_eq!(p.pos, Self::SIZE);
        buf
    }

    fn get(raw: &[u8; Self::SIZE]) -> Self {
        let mut g = Get::new(raw);
        Self {
            magic: g.u64(),
            seq: g.u64(),
            cache_set_uuid: g.arr(),
            segment_index: g.u32(),
            nr_records: g.u32(),
            crc: g.u32(),
            block_size: g.u32(),
            reserved: g.arr(),
        }
    }
}

fn segment_crc(header: &SegmentHeaderOnDisk, record_bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(&header.encode_with_crc(0));
    crc32c::crc32c_append(c, record_bytes)
}

/// Encodes the header region of segment `segment` (seq `seq`) holding
/// `records` into `out`, which must be exactly `geom.header_bytes()` long.
/// Data block `i` must be written at `geom.slot_offset(segment, i)`.
pub fn encode_segment_header(
    geom: &SegmentGeometry,
    cache_set: Uuid,
    segment: SegmentId,
    seq: Seq,
    records: &[BlockRecordOnDisk],
    out: &mut [u8],
) -> Result<SegmentHeaderOnDisk, SegmentError> {
    if out.len() != geom.header_bytes() {
        return Err(SegmentError::Truncated { need: geom.header_bytes(), got: out.len() });
    }
    let n = u32::try_from(records.len()).unwrap_or(u32::MAX);
    if n > geom.slots_per_segment() {
        return Err(SegmentError::TooManyRecords { n, max: geom.slots_per_segment() });
    }
    if let Some(i) = records.iter().position(|r| !r.is_valid()) {
        return Err(SegmentError::BadRecord { index: i as u32, raw_flags: records[i].flags });
    }
    out.fill(0);
    let rec_end = geom.record_offset(n);
    {
        let mut p = Put::new(&mut out[RECORDS_OFFSET..rec_end]);
        for r in records {
            r.put(&mut p);
        }
        debug_assert_eq!(p.pos, rec_end - RECORDS_OFFSET);
    }
    let mut h = SegmentHeaderOnDisk {
        magic: SEGMENT_MAGIC,
        seq: seq.0,
        cache_set_uuid: *cache_set.as_bytes(),
        segment_index: segment.0,
        nr_records: n,
        crc: 0,
        block_size: geom.block_size(),
        reserved: [0; 16],
    };
    h.crc = segment_crc(&h, &out[RECORDS_OFFSET..rec_end]);
    out[..SegmentHeaderOnDisk::SIZE].copy_from_slice(&h.encode_with_crc(h.crc));
    Ok(h)
}

/// A segment whose header checked out (data not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    pub header: SegmentHeaderOnDisk,
    pub records: Vec<BlockRecordOnDisk>,
}

impl SegmentSummary {
    pub fn seq(&self) -> Seq {
        Seq(self.header.seq)
    }
}

/// A fully verified segment: header crc, every record, every data crc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSegment {
    pub segment: SegmentId,
    pub seq: Seq,
    /// `records[i]` describes data slot `i`.
    pub records: Vec<BlockRecordOnDisk>,
}

/// Decodes and checks the header region of segment `segment` (recovery can
/// call this first, to sort segments by seq, before reading data).
pub fn decode_segment_header(
    geom: &SegmentGeometry,
    cache_set: Uuid,
    segment: SegmentId,
    header_bytes: &[u8],
) -> Result<SegmentSummary, SegmentError> {
    let raw: &[u8; SegmentHeaderOnDisk::SIZE] = take(header_bytes)
        .filter(|_| header_bytes.len() >= geom.header_bytes())
        .ok_or(SegmentError::Truncated { need: geom.header_bytes(), got: header_bytes.len() })?;
    let header = SegmentHeaderOnDisk::get(raw);
    if header.magic != SEGMENT_MAGIC {
        return Err(SegmentError::NoMagic);
    }
    let n = header.nr_records;
    if n > geom.slots_per_segment() {
        // A header with a bad count may be torn; check the crc first when we
        // can't, report the count.
        return Err(SegmentError::TooManyRecords { n, max: geom.slots_per_segment() });
    }
    let rec_bytes = &header_bytes[RECORDS_OFFSET..geom.record_offset(n)];
    let computed = segment_crc(&header, rec_bytes);
    if computed != header.crc {
        return Err(SegmentError::HeaderChecksum { stored: header.crc, computed });
    }
    if header.cache_set_uuid != *cache_set.as_bytes() {
        return Err(SegmentError::ForeignCacheSet { found: Uuid::from_bytes(header.cache_set_uuid) });
    }
    if header.segment_index != segment.0 {
        return Err(SegmentError::Misplaced { expected: segment, found: header.segment_index });
    }
    if header.block_size != geom.block_size() {
        return Err(SegmentError::BlockSizeMismatch { expected: geom.block_size(), found: header.block_size });
    }
    let mut g = Get::new(rec_bytes);
    let mut records = Vec::with_capacity(n as usize);
    for i in 0..n {
        let r = BlockRecordOnDisk::get(&mut g);
        if !r.is_valid() {
            return Err(SegmentError::BadRecord { index: i, raw_flags: r.flags });
        }
        records.push(r);
    }
    Ok(SegmentSummary { header, records })
}

/// Verifies a whole segment: `header_bytes` is its header region
/// (`geom.header_bytes()`), `data_bytes` its data region (at least the
/// first n slots). Any data crc mismatch means the segment write was torn.
pub fn verify_segment(
    geom: &SegmentGeometry,
    cache_set: Uuid,
    segment: SegmentId,
    header_bytes: &[u8],
    data_bytes: &[u8],
) -> Result<ValidSegment, SegmentError> {
    let s = decode_segment_header(geom, cache_set, segment, header_bytes)?;
    let bs = geom.block_size() as usize;
    let need = s.records.len() * bs;
    if data_bytes.len() < need {
        return Err(SegmentError::Truncated { need, got: data_bytes.len() });
    }
    for (i, (r, block)) in s.records.iter().zip(data_bytes.chunks_exact(bs)).enumerate() {
        if r.carries_data() {
            let computed = crc32c::crc32c(block);
            if computed != r.data_crc {
                return Err(SegmentError::TornData { record: i as u32, stored: r.data_crc, computed });
            }
        }
    }
    Ok(ValidSegment { segment, seq: s.seq(), records: s.records })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1024 * 1024;

    fn uuid(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn fresh(bs: u32, ss: u32, dev: u64) -> SuperblockOnDisk {
        format_superblock(FormatParams { cache_set: uuid(7), block_size: bs, segment_size: ss, device_size: dev })
            .expect("format")
    }

    fn expect(dev: u64) -> SuperblockExpect {
        SuperblockExpect { block_size: Some(4096), segment_size: Some(DEFAULT_SEGMENT_SIZE), device_size: dev }
    }

    #[test]
    fn format_fills_the_device() {
        let sb = fresh(4096, DEFAULT_SEGMENT_SIZE, 64 * MIB + 4096);
        assert_eq!(sb.nr_segments, 126); // (64 MiB - 1 MiB) / 512 KiB
        assert_eq!(sb.sb_seq, 1);
        assert_eq!(sb.writeback_seq, 0);
        assert!(sb.backing.iter().all(|e| e.state == BackingState::Free));
        assert_eq!(sb.total_slots().unwrap(), 126 * 127);
    }

    #[test]
    fn superblock_roundtrip_and_layout() {
        let mut sb = fresh(4096, DEFAULT_SEGMENT_SIZE, 64 * MIB);
        sb.register_backing(uuid(1), 1000, CacheMode::WriteBack).unwrap();
        sb.register_backing(uuid(2), 2000, CacheMode::WriteThrough).unwrap();
        let bytes = sb.encode();
        assert_eq!(&bytes[..8], b"TIERC-SB");
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), FORMAT_VERSION);
        assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 1); // sb_seq LE at 16
        let back = SuperblockOnDisk::decode(&bytes).unwrap();
        assert_eq!(back.crc, sb.compute_crc());
        let mut sb2 = sb.clone();
        sb2.crc = back.crc;
        assert_eq!(back, sb2);
        // The 4 KiB slot decodes too.
        assert_eq!(SuperblockOnDisk::decode(&sb.encode_slot()).unwrap(), back);
    }

    #[test]
    fn superblock_validation_errors() {
        let sb = fresh(4096, DEFAULT_SEGMENT_SIZE, 64 * MIB);
        let good = sb.encode();
        assert_eq!(SuperblockOnDisk::decode(&[0u8; 640]), Err(FormatError::NotACacheDevice));
        assert!(matches!(SuperblockOnDisk::decode(&good[..100]), Err(FormatError::Truncated { need: 640, .. })));
        let mut flipped = good;
        flipped[300] ^= 1;
        assert!(matches!(SuperblockOnDisk::decode(&flipped), Err(FormatError::Checksum { .. })));
        let mut v2 = sb.clone();
        v2.version = 2;
        assert_eq!(
            SuperblockOnDisk::decode(&v2.encode()),
            Err(FormatError::UnknownVersion { what: Structure::Superblock, version: 2 })
        );
        let mut bad_bs = sb.clone();
        bad_bs.block_size = 1024;
        assert!(matches!(
            SuperblockOnDisk::decode(&bad_bs.encode()),
            Err(FormatError::InvalidField { field: Field::BlockSize, value: 1024, .. })
        ));
        let mut bad_ss = sb.clone();
        bad_ss.segment_size = 3 * 128 * 1024;
        assert!(matches!(
            SuperblockOnDisk::decode(&bad_ss.encode()),
            Err(FormatError::InvalidField { field: Field::SegmentSize, .. })
        ));
        let mut too_many = sb.clone();
        too_many.nr_segments += 1;
        assert!(matches!(
            SuperblockOnDisk::decode(&too_many.encode()),
            Err(FormatError::InvalidField { field: Field::DeviceSize, .. })
        ));
        let mut bad_entry = sb.clone();
        bad_entry.backing[3] = BackingEntryOnDisk {
            backing_uuid: [9; 16],
            data_blocks: 1,
            backing_idx: 4,
            state: BackingState::Attached,
            ..Default::default()
        };
        assert!(matches!(
            SuperblockOnDisk::decode(&bad_entry.encode()),
            Err(FormatError::InvalidField { field: Field::BackingEntry(3), .. })
        ));
        let mut bad_state = sb.encode();
        bad_state[128 + 25] = 9; // entry 0 state byte
        let crc = crc32c::crc32c(&{
            let mut z = bad_state;
            z[12..16].fill(0);
            z
        });
        bad_state[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            SuperblockOnDisk::decode(&bad_state),
            Err(FormatError::InvalidField { field: Field::BackingState, value: 9, .. })
        ));
        // Expectations.
        assert_eq!(
            sb.check_expect(&SuperblockExpect { block_size: Some(512), segment_size: None, device_size: 64 * MIB }),
            Err(FormatError::BlockSizeMismatch { expected: 512, found: 4096 })
        );
        assert_eq!(
            sb.check_expect(&SuperblockExpect {
                block_size: None,
                segment_size: Some(MAX_SEGMENT_SIZE),
                device_size: 64 * MIB
            }),
            Err(FormatError::SegmentSizeMismatch { expected: MAX_SEGMENT_SIZE, found: DEFAULT_SEGMENT_SIZE })
        );
        assert_eq!(
            sb.check_expect(&expect(32 * MIB)),
            Err(FormatError::DeviceTooSmall { superblock_says: 64 * MIB, actual: 32 * MIB })
        );
        assert!(sb.check_expect(&expect(128 * MIB)).is_ok());
        // Too small to format.
        assert!(matches!(
            format_superblock(FormatParams {
                cache_set: uuid(1),
                block_size: 4096,
                segment_size: DEFAULT_SEGMENT_SIZE,
                device_size: MIB + 512 * 1024,
            }),
            Err(FormatError::InvalidField { field: Field::SegmentCount, value: 1, .. })
        ));
    }

    #[test]
    fn load_picks_newest_valid_copy_and_survives_interrupted_update() {
        let dev = 64 * MIB;
        let sb = fresh(4096, DEFAULT_SEGMENT_SIZE, dev);
        let mut a = sb.encode_slot();
        let mut b = sb.encode_slot();
        let mut loaded = load_superblock(&a, &b, &expect(dev)).unwrap();
        assert_eq!(loaded.from, SuperblockCopy::A);
        // Updates alternate B, A, B ...
        for round in 0..4u64 {
            let w = loaded.begin_update(|s| s.writeback_seq = 10 + round).unwrap();
            assert_eq!(w.target, loaded.from.other());
            assert_eq!(w.sb.sb_seq, loaded.sb.sb_seq + 1);
            match w.target {
                SuperblockCopy::A => a = w.bytes(),
                SuperblockCopy::B => b = w.bytes(),
            }
            loaded.complete_update(w);
            let reread = load_superblock(&a, &b, &expect(dev)).unwrap();
            assert_eq!(reread.sb, loaded.sb);
            assert_eq!(reread.from, loaded.from);
        }
        assert_eq!(loaded.sb.writeback_seq, 13);
        // Interrupted update: the copy being written is garbage (torn).
        let w = loaded.begin_update(|s| s.writeback_seq = 99).unwrap();
        let mut torn = w.bytes();
        torn[200..4096].fill(0xA5);
        let (ta, tb) = match w.target {
            SuperblockCopy::A => (torn.clone(), b.clone()),
            SuperblockCopy::B => (a.clone(), torn.clone()),
        };
        let after = load_superblock(&ta, &tb, &expect(dev)).unwrap();
        assert_eq!(after.sb.writeback_seq, 13, "the older intact copy wins");
        assert_eq!(after.from, w.target.other());
        assert!(matches!(after.other_error, Some(FormatError::Checksum { .. })));
        // Half-written: only the start of the new copy landed (new crc, old fields).
        let mut half = match w.target {
            SuperblockCopy::A => a.clone(),
            SuperblockCopy::B => b.clone(),
        };
        half[..20].copy_from_slice(&w.bytes()[..20]);
        let (ha, hb) = match w.target {
            SuperblockCopy::A => (half, b.clone()),
            SuperblockCopy::B => (a.clone(), half),
        };
        assert_eq!(load_superblock(&ha, &hb, &expect(dev)).unwrap().sb.writeback_seq, 13);
        // Both garbage.
        let zero = vec![0u8; 4096];
        assert_eq!(load_superblock(&zero, &zero, &expect(dev)), Err(FormatError::NotACacheDevice));
        let mut bad_a = a.clone();
        bad_a[20] ^= 0xff;
        assert!(matches!(
            load_superblock(&bad_a, &torn, &expect(dev)),
            Err(FormatError::BothSuperblocksCorrupt { .. })
        ));
        // One valid, one never written.
        assert!(load_superblock(&zero, &b, &expect(dev)).is_ok());
        // A newer-version copy is reported, not rolled back over.
        let mut v2 = loaded.sb.clone();
        v2.version = 2;
        v2.sb_seq += 10;
        assert!(matches!(
            load_superblock(&a, &v2.encode_slot(), &expect(dev)),
            Err(FormatError::UnknownVersion { version: 2, .. })
        ));
        // Expectation mismatch on the winner.
        assert!(matches!(load_superblock(&a, &b, &expect(MIB * 8)), Err(FormatError::DeviceTooSmall { .. })));
    }

    #[test]
    fn backing_table_and_reattach_by_uuid() {
        let mut sb = fresh(4096, DEFAULT_SEGMENT_SIZE, 64 * MIB);
        let i1 = sb.register_backing(uuid(1), 100, CacheMode::WriteBack).unwrap();
        let i2 = sb.register_backing(uuid(2), 200, CacheMode::WriteAround).unwrap();
        assert_eq!((i1, i2), (BackingIdx(0), BackingIdx(1)));
        assert_eq!(
            sb.register_backing(uuid(1), 1, CacheMode::WriteBack),
            Err(FormatError::BackingAlreadyRegistered { backing: uuid(1) })
        );
        let h1 = BackingHeaderOnDisk::new(uuid(1), uuid(7), i1, DEFAULT_DATA_OFFSET, 100 * 4096).unwrap();
        let h2 = BackingHeaderOnDisk::new(uuid(2), uuid(7), i2, DEFAULT_DATA_OFFSET, 200 * 4096).unwrap();
        // Devices show up in any order; each finds its own index by UUID.
        for h in [&h2, &h1] {
            let dec = BackingHeaderOnDisk::decode_for_set(&h.encode(), uuid(7)).unwrap();
            let idx = sb.attach_backing(&dec).unwrap();
            assert_eq!(idx.0, h.backing_idx);
        }
        let foreign = BackingHeaderOnDisk::new(uuid(3), uuid(8), BackingIdx(0), DEFAULT_DATA_OFFSET, 1).unwrap();
        assert_eq!(
            BackingHeaderOnDisk::decode_for_set(&foreign.encode(), uuid(7)),
            Err(FormatError::ForeignCacheSet { expected: uuid(7), found: uuid(8) })
        );
        assert_eq!(
            sb.attach_backing(&foreign),
            Err(FormatError::ForeignCacheSet { expected: uuid(7), found: uuid(8) })
        );
        let unknown = BackingHeaderOnDisk::new(uuid(3), uuid(7), BackingIdx(2), DEFAULT_DATA_OFFSET, 1).unwrap();
        assert_eq!(sb.attach_backing(&unknown), Err(FormatError::UnknownBacking { backing: uuid(3) }));
        let wrong_idx = BackingHeaderOnDisk::new(uuid(2), uuid(7), BackingIdx(5), DEFAULT_DATA_OFFSET, 1).unwrap();
        assert!(matches!(sb.attach_backing(&wrong_idx), Err(FormatError::BackingIdxMismatch { .. })));
        sb.backing[0].state = BackingState::Retired;
        assert_eq!(sb.attach_backing(&h1), Err(FormatError::BackingRetired { backing: uuid(1) }));
        for n in 2..16 {
            sb.register_backing(uuid(10 + n), 1, CacheMode::WriteBack).unwrap();
        }
        assert_eq!(sb.register_backing(uuid(99), 1, CacheMode::WriteBack), Err(FormatError::BackingTableFull));
        // The table survives encode/decode.
        let back = SuperblockOnDisk::decode(&sb.encode()).unwrap();
        assert_eq!(back.backing, sb.backing);
    }

    #[test]
    fn backing_header_errors() {
        let h = BackingHeaderOnDisk::new(uuid(1), uuid(7), BackingIdx(3), DEFAULT_DATA_OFFSET, 4096).unwrap();
        let bytes = h.encode();
        assert_eq!(&bytes[..8], b"TIERC-BK");
        let mut h2 = h.clone();
        h2.crc = BackingHeaderOnDisk::decode(&bytes).unwrap().crc;
        assert_eq!(BackingHeaderOnDisk::decode(&bytes).unwrap(), h2);
        assert_eq!(BackingHeaderOnDisk::decode(&[0u8; 72]), Err(FormatError::NotABackingDevice));
        let mut flip = bytes;
        flip[40] ^= 4;
        assert!(matches!(BackingHeaderOnDisk::decode(&flip), Err(FormatError::Checksum { .. })));
        let mut v9 = h.clone();
        v9.version = 9;
        assert!(matches!(
            BackingHeaderOnDisk::decode(&v9.encode()),
            Err(FormatError::UnknownVersion { version: 9, .. })
        ));
        let mut dirty = h.clone();
        dirty.state = BackingHeaderState::Dirty;
        assert_eq!(BackingHeaderOnDisk::decode(&dirty.encode()).unwrap().state, BackingHeaderState::Dirty);
        assert!(BackingHeaderOnDisk::new(uuid(1), uuid(7), BackingIdx(16), DEFAULT_DATA_OFFSET, 1).is_err());
        assert!(BackingHeaderOnDisk::new(uuid(1), uuid(7), BackingIdx(0), 100, 1).is_err());
        assert!(matches!(BackingHeaderOnDisk::decode(&bytes[..71]), Err(FormatError::Truncated { .. })));
    }

    #[test]
    fn geometry_for_several_sizes() {
        // (block, segment) -> (header blocks, slots)
        let cases = [
            (4096, 128 * 1024, 1, 31),
            (4096, 512 * 1024, 1, 127),
            (4096, 1024 * 1024, 2, 254),
            (4096, 4 * 1024 * 1024, 5, 1019),
            (512, 128 * 1024, 9, 247),
            (512, 512 * 1024, 32, 992),
            (512, 4 * 1024 * 1024, 250, 7942),
        ];
        for (bs, ss, hb, n) in cases {
            let g = SegmentGeometry::new(bs, ss).unwrap();
            assert_eq!((g.header_blocks(), g.slots_per_segment()), (hb, n), "bs {bs} ss {ss}");
            let blocks = ss / bs;
            assert!(g.header_blocks() + g.slots_per_segment() <= blocks);
            // Maximal: one more record would not fit.
            let more = (RECORDS_OFFSET as u64 + u64::from(n + 1) * 16).div_ceil(u64::from(bs)) as u32;
            assert!(more + n + 1 > blocks);
            assert!(g.record_offset(n) <= g.header_bytes());
            assert_eq!(g.header_bytes() + g.data_bytes(), ((hb + n) * bs) as usize);
            assert_eq!(g.segment_offset(SegmentId(3)), SEGMENTS_OFFSET + 3 * u64::from(ss));
            assert_eq!(g.slot_offset(SegmentId(2), 0), SEGMENTS_OFFSET + 2 * u64::from(ss) + u64::from(hb * bs));
            assert!(g.slot_offset(SegmentId(2), n - 1) + u64::from(bs) <= g.segment_offset(SegmentId(3)));
            for slot in [0, 1, n - 1, n, 5 * n + 7] {
                let (k, i) = g.slot_location(SlotId(slot));
                assert_eq!(g.slot_id(k, i), SlotId(slot));
                assert_eq!(g.slot_id_offset(SlotId(slot)), g.slot_offset(k, i));
            }
        }
        for bad in [(1024, 512 * 1024), (4096, 64 * 1024), (4096, 8 * 1024 * 1024), (4096, 384 * 1024)] {
            assert!(SegmentGeometry::new(bad.0, bad.1).is_err());
        }
    }

    #[test]
    fn records_never_straddle_a_sector() {
        for (bs, ss) in [(512, 128 * 1024), (512, 4 * 1024 * 1024), (4096, 512 * 1024), (4096, 4 * 1024 * 1024)] {
            let g = SegmentGeometry::new(bs, ss).unwrap();
            for i in 0..g.slots_per_segment() {
                let start = g.record_offset(i);
                let end = start + BlockRecordOnDisk::SIZE - 1;
                assert_eq!(start / SECTOR_SIZE, end / SECTOR_SIZE, "record {i} straddles");
                assert!(start >= SegmentHeaderOnDisk::SIZE);
            }
        }
        let r = BlockRecordOnDisk::with_data(Lba(0xABCD_EF01_2345), BackingIdx(15), record_flags::DIRTY, &[1; 512]);
        let mut buf = [0u8; 16];
        r.put(&mut Put::new(&mut buf));
        assert_eq!(&buf[..6], &[0x45, 0x23, 0x01, 0xEF, 0xCD, 0xAB]);
        assert_eq!(buf[6], 15);
        assert_eq!(buf[7], record_flags::DIRTY);
        assert_eq!(BlockRecordOnDisk::get(&mut Get::new(&buf)), r);
        assert_eq!(r.lba(), Lba(0xABCD_EF01_2345));
    }

    #[test]
    fn record_flag_rules() {
        use record_flags::*;
        let mk = |flags, crc| BlockRecordOnDisk { flags, data_crc: crc, ..Default::default() };
        assert!(mk(DIRTY, 5).is_valid());
        assert!(mk(CLEAN, 5).is_valid());
        assert!(mk(DIRTY | ZERO, 0).is_valid());
        assert!(mk(CLEAN | ZERO, 0).is_valid());
        assert!(mk(TOMBSTONE, 0).is_valid());
        assert!(!mk(TOMBSTONE | ZERO, 0).is_valid());
        assert!(!mk(DIRTY | CLEAN, 0).is_valid());
        assert!(!mk(0, 0).is_valid());
        assert!(!mk(DIRTY | 0x80, 0).is_valid());
        assert!(!mk(TOMBSTONE, 1).is_valid());
        assert!(!BlockRecordOnDisk { backing_idx: 16, flags: DIRTY, ..Default::default() }.is_valid());
    }

    struct Seg {
        geom: SegmentGeometry,
        header: Vec<u8>,
        data: Vec<u8>,
    }

    fn build(bs: u32, n: u32, seq: u64) -> Seg {
        let geom = SegmentGeometry::new(bs, 128 * 1024).unwrap();
        let mut data = vec![0u8; geom.data_bytes()];
        let mut recs = Vec::new();
        for i in 0..n {
            let block = &mut data[(i * bs) as usize..((i + 1) * bs) as usize];
            block.fill(i as u8 ^ 0x5a);
            block[0] = 1;
            let r = match i % 4 {
                0 | 1 => BlockRecordOnDisk::with_data(Lba(u64::from(i) * 3), BackingIdx(1), record_flags::DIRTY, block),
                2 => BlockRecordOnDisk::without_data(Lba(7), BackingIdx(0), record_flags::TOMBSTONE),
                _ => BlockRecordOnDisk::without_data(Lba(9), BackingIdx(2), record_flags::CLEAN | record_flags::ZERO),
            };
            recs.push(r);
        }
        let mut header = vec![0u8; geom.header_bytes()];
        encode_segment_header(&geom, uuid(7), SegmentId(4), Seq(seq), &recs, &mut header).unwrap();
        Seg { geom, header, data }
    }

    #[test]
    fn segment_roundtrip_and_torn_detection() {
        for bs in [512, 4096] {
            let s = build(bs, 20, 42);
            let v = verify_segment(&s.geom, uuid(7), SegmentId(4), &s.header, &s.data).unwrap();
            assert_eq!(v.seq, Seq(42));
            assert_eq!(v.records.len(), 20);
            assert_eq!(v.records[4].lba(), Lba(12));
            assert_eq!(&s.header[..8], b"TIERC-SG");
            // Torn data: a data block from before the write.
            let mut torn = s.data.clone();
            torn[(5 * bs + 3) as usize] ^= 0xff;
            assert!(matches!(
                verify_segment(&s.geom, uuid(7), SegmentId(4), &s.header, &torn),
                Err(SegmentError::TornData { record: 5, .. })
            ));
            // Data of a record without data is not checked.
            let mut nodata = s.data.clone();
            nodata[(2 * bs) as usize] ^= 0xff;
            assert!(verify_segment(&s.geom, uuid(7), SegmentId(4), &s.header, &nodata).is_ok());
            // Torn header: a record sector from an older write.
            let mut th = s.header.clone();
            th[RECORDS_OFFSET + 16 * 3 + 2] ^= 1;
            let e = verify_segment(&s.geom, uuid(7), SegmentId(4), &th, &s.data).unwrap_err();
            assert!(matches!(e, SegmentError::HeaderChecksum { .. }) && e.is_unwritten());
            // Never written.
            let zero = vec![0u8; s.geom.header_bytes()];
            assert_eq!(verify_segment(&s.geom, uuid(7), SegmentId(4), &zero, &s.data), Err(SegmentError::NoMagic));
            // Stale after re-format / misplaced / wrong block size.
            assert!(matches!(
                verify_segment(&s.geom, uuid(8), SegmentId(4), &s.header, &s.data),
                Err(SegmentError::ForeignCacheSet { .. })
            ));
            assert!(matches!(
                verify_segment(&s.geom, uuid(7), SegmentId(5), &s.header, &s.data),
                Err(SegmentError::Misplaced { found: 4, .. })
            ));
            let other_bs = if bs == 512 { 4096 } else { 512 };
            let g2 = SegmentGeometry::new(other_bs, 128 * 1024).unwrap();
            let mut h2 = s.header.clone();
            h2.resize(g2.header_bytes().max(s.header.len()), 0);
            let e = verify_segment(&g2, uuid(7), SegmentId(4), &h2, &s.data).unwrap_err();
            assert!(matches!(e, SegmentError::BlockSizeMismatch { .. } | SegmentError::TornData { .. }), "{e:?}");
            // Short buffers.
            assert!(matches!(
                verify_segment(&s.geom, uuid(7), SegmentId(4), &s.header[..100], &s.data),
                Err(SegmentError::Truncated { .. })
            ));
            assert!(matches!(
                verify_segment(&s.geom, uuid(7), SegmentId(4), &s.header, &s.data[..bs as usize]),
                Err(SegmentError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn segment_encode_rejects_bad_input() {
        let geom = SegmentGeometry::new(4096, 128 * 1024).unwrap();
        let mut out = vec![0u8; geom.header_bytes()];
        let r = BlockRecordOnDisk::without_data(Lba(1), BackingIdx(0), record_flags::TOMBSTONE);
        let too_many = vec![r; 32];
        assert_eq!(
            encode_segment_header(&geom, uuid(1), SegmentId(0), Seq(1), &too_many, &mut out),
            Err(SegmentError::TooManyRecords { n: 32, max: 31 })
        );
        let bad = [BlockRecordOnDisk { flags: 0, ..r }];
        assert!(matches!(
            encode_segment_header(&geom, uuid(1), SegmentId(0), Seq(1), &bad, &mut out),
            Err(SegmentError::BadRecord { index: 0, .. })
        ));
        let mut short = vec![0u8; 10];
        assert!(encode_segment_header(&geom, uuid(1), SegmentId(0), Seq(1), &[r], &mut short).is_err());
        // An empty segment is valid.
        encode_segment_header(&geom, uuid(1), SegmentId(0), Seq(1), &[], &mut out).unwrap();
        assert_eq!(verify_segment(&geom, uuid(1), SegmentId(0), &out, &[]).unwrap().records.len(), 0);
        // A header claiming more records than fit is rejected, not trusted.
        let mut lie = out.clone();
        lie[36..40].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            decode_segment_header(&geom, uuid(1), SegmentId(0), &lie),
            Err(SegmentError::TooManyRecords { n: 1000, .. })
        ));
    }

    fn arb_record() -> impl Strategy<Value = BlockRecordOnDisk> {
        use record_flags::*;
        (
            0..LBA_LIMIT,
            0u8..16,
            prop::sample::select(vec![DIRTY, CLEAN, TOMBSTONE, DIRTY | ZERO, CLEAN | ZERO]),
            any::<u32>(),
        )
            .prop_map(|(lba, idx, flags, crc)| {
                let r = BlockRecordOnDisk::without_data(Lba(lba), BackingIdx(idx), flags);
                if r.carries_data() {
                    BlockRecordOnDisk { data_crc: crc, ..r }
                } else {
                    r
                }
            })
    }

    proptest! {
        #[test]
        fn prop_superblock_roundtrip(
            seq in 1u64.., wb in any::<u64>(), bs in prop::sample::select(vec![512u32, 4096]),
            shift in 0u32..6, extra in 0u64..(1 << 30), set in any::<[u8; 16]>(),
            backs in prop::collection::vec((any::<[u8; 16]>(), 0..LBA_LIMIT, 0u8..4), 0..16),
        ) {
            let ss = MIN_SEGMENT_SIZE << shift;
            let dev = SEGMENTS_OFFSET + 4 * u64::from(ss) + extra;
            let mut sb = format_superblock(FormatParams {
                cache_set: Uuid::from_bytes(set), block_size: bs, segment_size: ss, device_size: dev,
            }).unwrap();
            sb.sb_seq = seq;
            sb.writeback_seq = wb;
            for (u, blocks, mode) in backs {
                if u == [0; 16] { continue; }
                let mode = CacheMode::from_u8(mode).unwrap();
                let _ = sb.register_backing(Uuid::from_bytes(u), blocks, mode);
            }
            let back = SuperblockOnDisk::decode(&sb.encode()).unwrap();
            prop_assert_eq!(back.encode(), sb.encode());
            prop_assert_eq!(back.backing, sb.backing);
            prop_assert_eq!(back.nr_segments, sb.nr_segments);
        }

        #[test]
        fn prop_segment_roundtrip(recs in prop::collection::vec(arb_record(), 0..=31), seq in 1u64.., seg in 0u32..1000) {
            let geom = SegmentGeometry::new(4096, 128 * 1024).unwrap();
            let mut out = vec![0u8; geom.header_bytes()];
            encode_segment_header(&geom, uuid(3), SegmentId(seg), Seq(seq), &recs, &mut out).unwrap();
            let s = decode_segment_header(&geom, uuid(3), SegmentId(seg), &out).unwrap();
            prop_assert_eq!(s.records, recs);
            prop_assert_eq!(s.header.seq, seq);
        }

        #[test]
        fn prop_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
            let _ = SuperblockOnDisk::decode(&bytes);
            let _ = BackingHeaderOnDisk::decode(&bytes);
            let geom = SegmentGeometry::new(512, 128 * 1024).unwrap();
            let _ = verify_segment(&geom, uuid(1), SegmentId(0), &bytes, &bytes);
        }

        #[test]
        fn prop_single_bit_flip_detected(bit in 0usize..(SuperblockOnDisk::SIZE * 8)) {
            let sb = fresh(4096, DEFAULT_SEGMENT_SIZE, 64 * MIB);
            let mut b = sb.encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(SuperblockOnDisk::decode(&b).is_err());
        }
    }
}
