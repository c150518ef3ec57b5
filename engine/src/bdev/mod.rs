//! The block-device layer: one trait, many backends (SPDK's device / descriptor / channel).
//!
//! - A [`Bdev`] is the device: shared by all reactors (`Send + Sync`), it describes itself
//!   ([`BdevInfo`]) and creates channels.
//! - A [`BdevChannel`] is its per-reactor I/O path: created on, and used only by, one
//!   reactor; it needs no locks. A bdev backed by SPDK would map its `spdk_io_channel` here.
//! - An [`IoChannel`] wraps a backend channel with what every bdev needs once: request
//!   validation (range, alignment, size, supported type: a clear errno, never a panic),
//!   per-channel statistics, and retry of transient conditions (ENOMEM/EAGAIN are
//!   backpressure: the I/O is queued and retried, never failed for them).
//! - A [`BdevDesc`] is an open handle; `desc.channel()` finds (or creates) the current
//!   reactor's channel.
//!
//! I/O is addressed in bytes (`offset`, `len`) that must be multiples of the block size.
//! Buffers ([`IoBuf`]) travel with the request and come back with the completion.

mod channel;
mod registry;

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pub use channel::{validate, ChannelIo, IoChannel, IoStats};
pub use registry::{BdevDesc, BdevRegistry};

use crate::dma::IoBuf;
use crate::errno::Errno;
use crate::reactor::FileIo;

/// The kinds of I/O a bdev may support.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoType {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
}

impl IoType {
    pub const ALL: [IoType; 5] = [IoType::Read, IoType::Write, IoType::Flush, IoType::Unmap, IoType::WriteZeroes];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// SPDK's name for the type.
    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
            IoType::Unmap => "unmap",
            IoType::WriteZeroes => "write_zeroes",
        }
    }

    /// Whether the I/O changes data (refused on read-only exports, ENOSPC past the end).
    pub fn is_write_like(self) -> bool {
        matches!(self, IoType::Write | IoType::Unmap | IoType::WriteZeroes)
    }
}

/// A set of [`IoType`]s.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct IoTypes(u8);

impl IoTypes {
    pub const NONE: IoTypes = IoTypes(0);

    pub fn all() -> IoTypes {
        IoType::ALL.iter().fold(IoTypes::NONE, |s, t| s.with(*t))
    }

    pub fn with(self, t: IoType) -> IoTypes {
        IoTypes(self.0 | t.bit())
    }

    pub fn without(self, t: IoType) -> IoTypes {
        IoTypes(self.0 & !t.bit())
    }

    pub fn contains(self, t: IoType) -> bool {
        self.0 & t.bit() != 0
    }
}

/// What a bdev is, as every consumer sees it.
#[derive(Clone, Debug)]
pub struct BdevInfo {
    pub name: String,
    pub uuid: uuid::Uuid,
    /// 512 or 4096.
    pub block_size: u32,
    pub num_blocks: u64,
    /// "Malloc disk", "Uring disk", ...
    pub product_name: String,
    pub io_types: IoTypes,
    /// The bdev acknowledges writes before they are durable: FLUSH (and FUA) matter.
    pub volatile_cache: bool,
    /// Largest read/write it accepts in one I/O (bytes). Unmap/write-zeroes are not bounded
    /// by it.
    pub max_io_bytes: u64,
}

/// Default bound on one read/write.
pub const DEFAULT_MAX_IO_BYTES: u64 = 32 << 20;

impl BdevInfo {
    pub fn new(name: impl Into<String>, product: &str, block_size: u32, num_blocks: u64) -> BdevInfo {
        BdevInfo {
            name: name.into(),
            uuid: uuid::Uuid::new_v4(),
            block_size,
            num_blocks,
            product_name: product.into(),
            io_types: IoTypes::all(),
            volatile_cache: false,
            max_io_bytes: DEFAULT_MAX_IO_BYTES,
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }
}

/// Block sizes a bdev may have.
pub fn valid_block_size(bs: u32) -> bool {
    bs == 512 || bs == 4096
}

/// One I/O request. `buf` is required (and `buf.len() == len`) for reads and writes.
#[derive(Debug)]
pub struct IoRequest {
    pub io_type: IoType,
    pub offset: u64,
    pub len: u64,
    pub buf: Option<IoBuf>,
    /// Force unit access: the write is durable before it completes.
    pub fua: bool,
}

impl IoRequest {
    pub fn read(offset: u64, buf: IoBuf) -> IoRequest {
        IoRequest { io_type: IoType::Read, offset, len: buf.len() as u64, buf: Some(buf), fua: false }
    }
    pub fn write(offset: u64, buf: IoBuf, fua: bool) -> IoRequest {
        IoRequest { io_type: IoType::Write, offset, len: buf.len() as u64, buf: Some(buf), fua }
    }
    pub fn flush() -> IoRequest {
        IoRequest { io_type: IoType::Flush, offset: 0, len: 0, buf: None, fua: false }
    }
    pub fn unmap(offset: u64, len: u64) -> IoRequest {
        IoRequest { io_type: IoType::Unmap, offset, len, buf: None, fua: false }
    }
    pub fn write_zeroes(offset: u64, len: u64) -> IoRequest {
        IoRequest { io_type: IoType::WriteZeroes, offset, len, buf: None, fua: false }
    }
}

/// The outcome of an I/O; the buffer always comes back.
#[derive(Debug)]
pub struct IoCompletion {
    pub status: Result<(), Errno>,
    pub buf: Option<IoBuf>,
}

impl IoCompletion {
    pub fn ok(buf: Option<IoBuf>) -> IoCompletion {
        IoCompletion { status: Ok(()), buf }
    }
    pub fn err(e: Errno, buf: Option<IoBuf>) -> IoCompletion {
        IoCompletion { status: Err(e), buf }
    }
}

/// A bdev I/O in progress. An enum rather than a boxed future, so the common cases (done at
/// submission, or one io_uring file operation) allocate nothing.
pub struct IoFuture(IoFutureInner);

enum IoFutureInner {
    Ready(Option<IoCompletion>),
    File(FileIo),
    Boxed(Pin<Box<dyn Future<Output = IoCompletion>>>),
}

impl IoFuture {
    pub fn ready(c: IoCompletion) -> IoFuture {
        IoFuture(IoFutureInner::Ready(Some(c)))
    }
    pub fn file(f: FileIo) -> IoFuture {
        IoFuture(IoFutureInner::File(f))
    }
    pub fn boxed(f: impl Future<Output = IoCompletion> + 'static) -> IoFuture {
        IoFuture(IoFutureInner::Boxed(Box::pin(f)))
    }
}

impl Future for IoFuture {
    type Output = IoCompletion;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoCompletion> {
        match &mut self.0 {
            IoFutureInner::Ready(c) => Poll::Ready(c.take().expect("IoFuture polled after completion")),
            IoFutureInner::File(f) => Pin::new(f).poll(cx).map(|(status, buf)| IoCompletion { status, buf }),
            IoFutureInner::Boxed(f) => f.as_mut().poll(cx),
        }
    }
}

/// A block device.
pub trait Bdev: Send + Sync + 'static {
    fn info(&self) -> &BdevInfo;

    /// Create this bdev's I/O channel for the calling reactor. Called at most once per
    /// reactor per descriptor; the channel is used only on that reactor.
    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno>;

    /// Module name ("malloc", "uring", ...).
    fn driver(&self) -> &'static str;

    /// Module-specific description for `bdev_get_bdevs`.
    fn driver_specific(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// The RPC call (method, params) that recreates this bdev, for `save_config`.
    fn config_call(&self) -> Option<(String, serde_json::Value)> {
        None
    }

    /// Names of the bdevs this one is built on.
    fn base_bdevs(&self) -> Vec<String> {
        Vec::new()
    }

    /// Called once when the bdev is unregistered.
    fn shutdown(&self) {}

    /// For modules that need their concrete type back (RPCs that act on one bdev type).
    fn as_any(&self) -> &dyn Any;
}

/// A bdev's I/O path on one reactor. Requests reaching it were validated by [`IoChannel`].
pub trait BdevChannel {
    fn submit(&self, io: IoRequest) -> IoFuture;
}
