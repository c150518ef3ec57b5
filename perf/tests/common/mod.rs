//! Helpers shared by the perf tests.
#![allow(dead_code)]

use std::any::Any;
use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tiercache_engine::bdev::{Bdev, BdevChannel, BdevInfo, IoFuture, IoRequest, IoType};
use tiercache_engine::Errno;
use tiercache_perf::report::{self, ConfigEcho, Report, TargetEcho};
use tiercache_perf::{run_job, start_reactors, JobConfig};

/// Run `cfg` on `reactors` unpinned, busy-polling reactors against `bdev`.
pub fn run(bdev: Arc<dyn Bdev>, cfg: &JobConfig, reactors: usize) -> Report {
    let cores = vec![None; reactors];
    let set = start_reactors(&cores, true, None, cfg.queue_depth).expect("reactors start");
    let outcome = run_job(&set, bdev.clone(), &cores, cfg, None, Arc::new(AtomicBool::new(false))).expect("job runs");
    set.stop();
    let info = bdev.info();
    let target = TargetEcho {
        kind: bdev.driver().into(),
        name: info.name.clone(),
        path: None,
        block_size: info.block_size,
        num_blocks: info.num_blocks,
        size_bytes: info.size_bytes(),
    };
    report::build(outcome, ConfigEcho::new(cfg, &cores, true), target, true)
}

/// A bdev that passes everything to `inner` but flips one byte of every block it reads at
/// the listed LBAs (silent corruption on the read path).
pub struct CorruptingBdev {
    pub inner: Arc<dyn Bdev>,
    pub bad_lbas: HashSet<u64>,
    pub flip_at: usize,
}

struct CorruptingChannel {
    inner: Box<dyn BdevChannel>,
    bad: Arc<HashSet<u64>>,
    block_size: u64,
    flip_at: usize,
}

impl Bdev for CorruptingBdev {
    fn info(&self) -> &BdevInfo {
        self.inner.info()
    }
    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        Ok(Box::new(CorruptingChannel {
            inner: self.inner.create_channel()?,
            bad: Arc::new(self.bad_lbas.clone()),
            block_size: self.inner.info().block_size as u64,
            flip_at: self.flip_at,
        }))
    }
    fn driver(&self) -> &'static str {
        "corrupting"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BdevChannel for CorruptingChannel {
    fn submit(&self, io: IoRequest) -> IoFuture {
        let is_read = io.io_type == IoType::Read;
        let (offset, bs, flip_at) = (io.offset, self.block_size, self.flip_at);
        let fut = self.inner.submit(io);
        if !is_read {
            return fut;
        }
        let bad = self.bad.clone();
        IoFuture::boxed(async move {
            let mut c = fut.await;
            if let Some(buf) = c.buf.as_mut() {
                for (i, block) in buf.chunks_exact_mut(bs as usize).enumerate() {
                    if bad.contains(&(offset / bs + i as u64)) {
                        block[flip_at] ^= 0x5a;
                    }
                }
            }
            c
        })
    }
}
