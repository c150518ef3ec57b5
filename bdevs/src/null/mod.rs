//! `null`: a bdev that completes every I/O at once and stores nothing (SPDK `bdev_null`).
//!
//! It is the engine-overhead baseline: no allocation, no copy and no syscall per I/O; the
//! future is [`IoFuture::ready`]. Reads return the caller's buffer **untouched** (like SPDK's
//! null bdev, which does not fill read buffers): whatever the buffer held is what the
//! caller gets back. Writes, flushes, unmaps and write-zeroes succeed without effect.

use std::any::Any;
use std::sync::Arc;

use tiercache_engine::bdev::{Bdev, BdevChannel, BdevInfo, IoCompletion, IoFuture, IoRequest};
use tiercache_engine::Errno;

/// A null bdev.
pub struct NullBdev {
    info: BdevInfo,
}

impl NullBdev {
    /// A null bdev of `num_blocks` blocks of `block_size` (512 or 4096) bytes. EINVAL for a
    /// bad name or geometry.
    pub fn create(name: &str, num_blocks: u64, block_size: u32) -> Result<Arc<NullBdev>, Errno> {
        Self::create_with_uuid(name, num_blocks, block_size, uuid::Uuid::new_v4())
    }

    /// Same, with a given UUID (recreating a saved configuration).
    pub fn create_with_uuid(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: uuid::Uuid,
    ) -> Result<Arc<NullBdev>, Errno> {
        crate::check_name(name)?;
        crate::checked_size(num_blocks, block_size)?;
        let mut info = BdevInfo::new(name, "Null disk", block_size, num_blocks);
        info.uuid = uuid;
        Ok(Arc::new(NullBdev { info }))
    }
}

impl Bdev for NullBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        Ok(Box::new(NullChannel { info: self.info.clone() }))
    }

    fn driver(&self) -> &'static str {
        "null"
    }

    fn driver_specific(&self) -> serde_json::Value {
        serde_json::json!({ "null": { "reads_return": "buffer untouched" } })
    }

    fn config_call(&self) -> Option<(String, serde_json::Value)> {
        Some((
            "bdev_null_create".into(),
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

/// The null bdev's channel: stateless.
pub struct NullChannel {
    info: BdevInfo,
}

impl BdevChannel for NullChannel {
    fn submit(&self, io: IoRequest) -> IoFuture {
        let status = crate::check_request(&self.info, &io);
        IoFuture::ready(IoCompletion { status, buf: io.buf })
    }
}
