//! Simulated storage for deterministic tests: the real engine code runs on top of it.
//!
//! [`SimDisk`] is a bdev whose contents live in RAM in two images: what a reader sees now
//! (`current`) and what would survive a power cut (`durable`). A write changes `current`
//! and is remembered as *pending*; a flush (or a FUA write) makes it durable. [`SimDisk::cut_power`]
//! then decides — from a seed — which pending writes made it anyway (any subset: the disk
//! may reorder unflushed writes) and may tear one of them at a sector boundary, exactly the
//! latitude a real disk with a volatile write cache has. The crash-consistency harness cuts
//! power at flush points and at random points, reopens the cache on the surviving image,
//! and checks every block against a model.

use std::any::Any;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::bdev::{Bdev, BdevChannel, BdevInfo, IoCompletion, IoFuture, IoRequest, IoType};
use crate::errno::Errno;

/// Sector size for tearing: a torn write persists a prefix of whole sectors.
pub const SECTOR: usize = 512;

struct Pending {
    offset: usize,
    data: Vec<u8>,
    /// Already durable (FUA): always survives, and is re-applied in order so that an
    /// older unflushed write to the same range cannot land on top of it.
    fua: bool,
}

struct State {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
    flushes: u64,
    writes: u64,
    /// Fail every I/O with this errno (device gone) when set.
    fail_all: Option<Errno>,
    /// Fail writes and flushes (reads still work) with this errno when set.
    fail_writes: Option<Errno>,
}

/// How a power cut treats writes that were not yet flushed.
#[derive(Clone, Copy, Debug)]
pub struct CutMode {
    /// Probability that each unflushed write survives anyway (reordering: any subset).
    pub survive_probability: f64,
    /// Tear one surviving write: persist only a random sector prefix of it.
    pub tear_one: bool,
}

impl CutMode {
    /// Drop every unflushed write.
    pub const DROP_ALL: CutMode = CutMode { survive_probability: 0.0, tear_one: false };
}

/// A RAM disk that models a volatile write cache and power loss.
pub struct SimDisk {
    info: BdevInfo,
    state: Arc<Mutex<State>>,
}

impl SimDisk {
    /// A zero-filled disk.
    pub fn new(name: &str, block_size: u32, num_blocks: u64) -> Arc<SimDisk> {
        let size = block_size as usize * num_blocks as usize;
        Self::from_image(name, block_size, vec![0; size])
    }

    /// A disk whose durable (and current) contents are `image`.
    pub fn from_image(name: &str, block_size: u32, image: Vec<u8>) -> Arc<SimDisk> {
        assert!(image.len().is_multiple_of(block_size as usize));
        let mut info = BdevInfo::new(name, "Simulated disk", block_size, (image.len() / block_size as usize) as u64);
        info.volatile_cache = true;
        Arc::new(SimDisk {
            info,
            state: Arc::new(Mutex::new(State {
                current: image.clone(),
                durable: image,
                pending: Vec::new(),
                flushes: 0,
                writes: 0,
                fail_all: None,
                fail_writes: None,
            })),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The image a power cut now would leave, decided by `seed`.
    pub fn cut_power(&self, seed: u64, mode: CutMode) -> Vec<u8> {
        let st = self.lock();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut image = st.durable.clone();
        // Survivors are applied in submission order: a disk never lets an older write to a
        // range land after a newer one to the same range.
        let p_survive = mode.survive_probability.clamp(0.0, 1.0);
        let survivors: Vec<&Pending> = st.pending.iter().filter(|p| p.fua || rng.gen_bool(p_survive)).collect();
        let tearable: Vec<usize> = (0..survivors.len()).filter(|&i| !survivors[i].fua).collect();
        let torn =
            if mode.tear_one && !tearable.is_empty() { Some(tearable[rng.gen_range(0..tearable.len())]) } else { None };
        for (i, p) in survivors.iter().enumerate() {
            let len = if Some(i) == torn {
                let sectors = p.data.len().div_ceil(SECTOR);
                (rng.gen_range(0..sectors) * SECTOR).min(p.data.len())
            } else {
                p.data.len()
            };
            image[p.offset..p.offset + len].copy_from_slice(&p.data[..len]);
        }
        image
    }

    /// What a reader sees now.
    pub fn current_image(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// (writes, flushes) seen so far.
    pub fn counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.writes, st.flushes)
    }

    /// Number of writes not yet covered by a flush.
    pub fn unflushed(&self) -> usize {
        self.lock().pending.len()
    }

    /// Make every I/O fail with `e` (None: recover).
    pub fn set_fail_all(&self, e: Option<Errno>) {
        self.lock().fail_all = e;
    }

    /// Make writes and flushes fail with `e` while reads still work (None: recover).
    pub fn set_fail_writes(&self, e: Option<Errno>) {
        self.lock().fail_writes = e;
    }
}

struct SimChannel {
    state: Arc<Mutex<State>>,
}

impl Bdev for SimDisk {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        Ok(Box::new(SimChannel { state: self.state.clone() }))
    }
    fn driver(&self) -> &'static str {
        "sim"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BdevChannel for SimChannel {
    fn submit(&self, mut io: IoRequest) -> IoFuture {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = st.fail_all {
            return IoFuture::ready(IoCompletion::err(e, io.buf));
        }
        if let (Some(e), true) = (st.fail_writes, io.io_type != IoType::Read) {
            return IoFuture::ready(IoCompletion::err(e, io.buf));
        }
        let off = io.offset as usize;
        let len = io.len as usize;
        if io.io_type != IoType::Flush && off.checked_add(len).is_none_or(|end| end > st.current.len()) {
            return IoFuture::ready(IoCompletion::err(Errno::EINVAL, io.buf));
        }
        match io.io_type {
            IoType::Read => {
                if let Some(b) = io.buf.as_mut() {
                    b.copy_from_slice(&st.current[off..off + len]);
                }
            }
            IoType::Write | IoType::WriteZeroes | IoType::Unmap => {
                let data: Vec<u8> = match (&io.buf, io.io_type) {
                    (Some(b), IoType::Write) => b.to_vec(),
                    _ => vec![0; len],
                };
                st.current[off..off + len].copy_from_slice(&data);
                st.writes += 1;
                if io.fua {
                    st.durable[off..off + len].copy_from_slice(&data);
                }
                st.pending.push(Pending { offset: off, data, fua: io.fua });
            }
            IoType::Flush => {
                let st = &mut *st;
                for p in st.pending.drain(..) {
                    st.durable[p.offset..p.offset + p.data.len()].copy_from_slice(&p.data);
                }
                st.flushes += 1;
            }
        }
        IoFuture::ready(IoCompletion::ok(io.buf))
    }
}
