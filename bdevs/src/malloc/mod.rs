//! `malloc`: a RAM bdev shared by every reactor (SPDK `bdev_malloc`).
//!
//! # Design
//!
//! The data lives in 1 MiB stripes, each behind its own `RwLock` (no `unsafe`): an I/O takes
//! the locks of the stripes it touches one at a time, in ascending order, copying its part
//! of each. Reactors working on different stripes never contend; on the same stripe,
//! readers share and a writer holds it for one `memcpy` of at most 1 MiB.
//!
//! Semantics are those of a real disk: each block is written atomically (a block never
//! straddles a stripe since 512 and 4096 divide 1 MiB), but overlapping I/Os that are in
//! flight at the same time have no ordering guarantee between them, and an I/O spanning
//! stripes is not atomic as a whole.
//!
//! Stripes are allocated on first write (reads of a never-written stripe return zeros), so
//! a large malloc bdev costs only the memory actually written. Unmap and write-zeroes zero
//! their range; a range covering a whole stripe frees it. An allocation failure completes
//! the I/O with ENOMEM, which the engine's `IoChannel` retries (backpressure).
//!
//! Writes are durable on completion (no volatile cache): flush and FUA are no-ops.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tiercache_engine::bdev::{Bdev, BdevChannel, BdevInfo, IoCompletion, IoFuture, IoRequest, IoType};
use tiercache_engine::Errno;

const STRIPE_SHIFT: u32 = 20;
/// Bytes per stripe (1 MiB).
pub const STRIPE_BYTES: u64 = 1 << STRIPE_SHIFT;

type Stripe = RwLock<Option<Box<[u8]>>>;

/// The memory of one malloc bdev, shared by the bdev and its channels.
struct Store {
    size: u64,
    stripes: Box<[Stripe]>,
    allocated: AtomicU64,
}

impl Store {
    fn new(size: u64) -> Result<Store, Errno> {
        let n = usize::try_from(size.div_ceil(STRIPE_BYTES)).map_err(|_| Errno::ENOMEM)?;
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|_| Errno::ENOMEM)?;
        v.extend((0..n).map(|_| RwLock::new(None)));
        Ok(Store { size, stripes: v.into_boxed_slice(), allocated: AtomicU64::new(0) })
    }

    fn stripe_len(&self, idx: usize) -> usize {
        let start = (idx as u64) << STRIPE_SHIFT;
        (self.size - start).min(STRIPE_BYTES) as usize
    }

    /// Split [offset, offset+len) into (stripe index, offset in stripe, length) pieces.
    /// The caller checked `offset + len <= size`.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize)> {
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let idx = (pos >> STRIPE_SHIFT) as usize;
            let in_off = (pos & (STRIPE_BYTES - 1)) as usize;
            let n = (end - pos).min(STRIPE_BYTES - in_off as u64) as usize;
            pos += n as u64;
            Some((idx, in_off, n))
        })
    }

    fn read(&self, offset: u64, dst: &mut [u8]) {
        let mut at = 0;
        for (idx, off, n) in self.pieces(offset, dst.len() as u64) {
            let s = self.stripes[idx].read().unwrap_or_else(|e| e.into_inner());
            match s.as_deref() {
                Some(data) => dst[at..at + n].copy_from_slice(&data[off..off + n]),
                None => dst[at..at + n].fill(0),
            }
            at += n;
        }
    }

    fn write(&self, offset: u64, src: &[u8]) -> Result<(), Errno> {
        let mut at = 0;
        for (idx, off, n) in self.pieces(offset, src.len() as u64) {
            let mut s = self.stripes[idx].write().unwrap_or_else(|e| e.into_inner());
            if s.is_none() {
                let len = self.stripe_len(idx);
                let mut v: Vec<u8> = Vec::new();
                v.try_reserve_exact(len).map_err(|_| Errno::ENOMEM)?;
                v.resize(len, 0);
                *s = Some(v.into_boxed_slice());
                self.allocated.fetch_add(len as u64, Ordering::Relaxed);
            }
            if let Some(data) = s.as_deref_mut() {
                data[off..off + n].copy_from_slice(&src[at..at + n]);
            }
            at += n;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) {
        for (idx, off, n) in self.pieces(offset, len) {
            let mut s = self.stripes[idx].write().unwrap_or_else(|e| e.into_inner());
            if off == 0 && n == self.stripe_len(idx) {
                if s.take().is_some() {
                    self.allocated.fetch_sub(n as u64, Ordering::Relaxed);
                }
            } else if let Some(data) = s.as_deref_mut() {
                data[off..off + n].fill(0);
            }
        }
    }
}

/// A RAM bdev.
pub struct MallocBdev {
    info: BdevInfo,
    store: Arc<Store>,
}

impl MallocBdev {
    /// A zero-filled RAM bdev of `num_blocks` blocks of `block_size` (512 or 4096) bytes.
    /// EINVAL for a bad name or geometry, ENOMEM if the stripe table cannot be allocated.
    pub fn create(name: &str, num_blocks: u64, block_size: u32) -> Result<Arc<MallocBdev>, Errno> {
        Self::create_with_uuid(name, num_blocks, block_size, uuid::Uuid::new_v4())
    }

    /// Same, with a given UUID (recreating a saved configuration).
    pub fn create_with_uuid(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: uuid::Uuid,
    ) -> Result<Arc<MallocBdev>, Errno> {
        crate::check_name(name)?;
        let size = crate::checked_size(num_blocks, block_size)?;
        let store = Arc::new(Store::new(size)?);
        let mut info = BdevInfo::new(name, "Malloc disk", block_size, num_blocks);
        info.uuid = uuid;
        info.volatile_cache = false;
        Ok(Arc::new(MallocBdev { info, store }))
    }

    /// Bytes of RAM currently holding data (stripes written and not unmapped since).
    pub fn allocated_bytes(&self) -> u64 {
        self.store.allocated.load(Ordering::Relaxed)
    }
}

impl Bdev for MallocBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        Ok(Box::new(MallocChannel { info: self.info.clone(), store: self.store.clone() }))
    }

    fn driver(&self) -> &'static str {
        "malloc"
    }

    fn driver_specific(&self) -> serde_json::Value {
        serde_json::json!({
            "malloc": {
                "stripe_bytes": STRIPE_BYTES,
                "allocated_bytes": self.allocated_bytes(),
            }
        })
    }

    fn config_call(&self) -> Option<(String, serde_json::Value)> {
        Some((
            "bdev_malloc_create".into(),
            serde_json::json!({
                "name": self.info.name,
                "num_blocks": self.info.num_blocks,
                "block_size": self.info.block_size,
                "uuid": self.info.uuid.to_string(),
            }),
        ))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A malloc bdev's channel: a handle on the shared stripes; every I/O completes at
/// submission (a memcpy), with no allocation beyond a stripe's first write.
pub struct MallocChannel {
    info: BdevInfo,
    store: Arc<Store>,
}

impl BdevChannel for MallocChannel {
    fn submit(&self, mut io: IoRequest) -> IoFuture {
        if let Err(e) = crate::check_request(&self.info, &io) {
            return IoFuture::ready(IoCompletion::err(e, io.buf));
        }
        let status = match (io.io_type, io.buf.as_mut()) {
            (IoType::Read, Some(buf)) => {
                self.store.read(io.offset, buf);
                Ok(())
            }
            (IoType::Write, Some(buf)) => self.store.write(io.offset, buf),
            (IoType::Unmap | IoType::WriteZeroes, _) => {
                self.store.zero(io.offset, io.len);
                Ok(())
            }
            (IoType::Flush, _) => Ok(()),
            // check_request guarantees a buffer for reads and writes.
            (IoType::Read | IoType::Write, None) => Err(Errno::EINVAL),
        };
        IoFuture::ready(IoCompletion { status, buf: io.buf })
    }
}
