//! [`IoChannel`]: validation, statistics and transient-error retry around a backend channel.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::{Bdev, BdevChannel, BdevInfo, IoCompletion, IoFuture, IoRequest, IoType};
use crate::dma::IoBuf;
use crate::errno::Errno;
use crate::reactor::{self, Sleep};

/// How long a transiently failing I/O (ENOMEM, EAGAIN, EBUSY, EINTR) keeps being retried
/// before its errno is reported (never as EIO).
pub const TRANSIENT_RETRY_LIMIT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_micros(10);
const BACKOFF_MAX: Duration = Duration::from_millis(10);

/// Per-channel I/O counters (SPDK's `bdev_get_iostat` fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoStats {
    pub num_read_ops: u64,
    pub bytes_read: u64,
    pub num_write_ops: u64,
    pub bytes_written: u64,
    pub num_unmap_ops: u64,
    pub bytes_unmapped: u64,
    pub num_write_zeroes_ops: u64,
    pub bytes_write_zeroes: u64,
    pub num_flush_ops: u64,
    pub num_errors: u64,
    pub num_retries: u64,
    pub num_rejected: u64,
}

impl IoStats {
    pub fn add(&mut self, o: &IoStats) {
        self.num_read_ops += o.num_read_ops;
        self.bytes_read += o.bytes_read;
        self.num_write_ops += o.num_write_ops;
        self.bytes_written += o.bytes_written;
        self.num_unmap_ops += o.num_unmap_ops;
        self.bytes_unmapped += o.bytes_unmapped;
        self.num_write_zeroes_ops += o.num_write_zeroes_ops;
        self.bytes_write_zeroes += o.bytes_write_zeroes;
        self.num_flush_ops += o.num_flush_ops;
        self.num_errors += o.num_errors;
        self.num_retries += o.num_retries;
        self.num_rejected += o.num_rejected;
    }
}

/// Per-field counters (a `Cell` each, so counting an I/O touches two words, not a copy of
/// the whole struct).
#[derive(Default)]
struct StatCells {
    read_ops: Cell<u64>,
    read_bytes: Cell<u64>,
    write_ops: Cell<u64>,
    write_bytes: Cell<u64>,
    unmap_ops: Cell<u64>,
    unmap_bytes: Cell<u64>,
    wz_ops: Cell<u64>,
    wz_bytes: Cell<u64>,
    flush_ops: Cell<u64>,
    errors: Cell<u64>,
    retries: Cell<u64>,
    rejected: Cell<u64>,
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

impl StatCells {
    fn snapshot(&self) -> IoStats {
        IoStats {
            num_read_ops: self.read_ops.get(),
            bytes_read: self.read_bytes.get(),
            num_write_ops: self.write_ops.get(),
            bytes_written: self.write_bytes.get(),
            num_unmap_ops: self.unmap_ops.get(),
            bytes_unmapped: self.unmap_bytes.get(),
            num_write_zeroes_ops: self.wz_ops.get(),
            bytes_write_zeroes: self.wz_bytes.get(),
            num_flush_ops: self.flush_ops.get(),
            num_errors: self.errors.get(),
            num_retries: self.retries.get(),
            num_rejected: self.rejected.get(),
        }
    }
}

/// The validated, counted, retrying I/O path to one bdev on one reactor.
pub struct IoChannel {
    bdev: Arc<dyn Bdev>,
    inner: Box<dyn BdevChannel>,
    stats: StatCells,
}

/// Check a request against the bdev's geometry and capabilities.
pub fn validate(info: &BdevInfo, req: &IoRequest) -> Result<(), Errno> {
    if !info.io_types.contains(req.io_type) {
        return Err(Errno::ENOTSUP);
    }
    if req.io_type == IoType::Flush {
        return Ok(());
    }
    let bs = info.block_size as u64;
    if req.len == 0 || !req.offset.is_multiple_of(bs) || !req.len.is_multiple_of(bs) {
        return Err(Errno::EINVAL);
    }
    let end = req.offset.checked_add(req.len).ok_or(Errno::EOVERFLOW)?;
    if end > info.size_bytes() {
        return Err(if req.io_type.is_write_like() { Errno::ENOSPC } else { Errno::EINVAL });
    }
    match req.io_type {
        IoType::Read | IoType::Write => {
            if req.len > info.max_io_bytes {
                return Err(Errno::EINVAL);
            }
            match &req.buf {
                Some(b) if b.len() as u64 == req.len => Ok(()),
                _ => Err(Errno::EINVAL),
            }
        }
        _ => Ok(()),
    }
}

impl IoChannel {
    pub fn new(bdev: Arc<dyn Bdev>) -> Result<IoChannel, Errno> {
        let inner = bdev.create_channel()?;
        Ok(IoChannel { bdev, inner, stats: StatCells::default() })
    }

    pub fn info(&self) -> &BdevInfo {
        self.bdev.info()
    }

    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    pub fn stats(&self) -> IoStats {
        self.stats.snapshot()
    }

    pub fn reset_stats(&self) {
        let c = &self.stats;
        for cell in [
            &c.read_ops,
            &c.read_bytes,
            &c.write_ops,
            &c.write_bytes,
            &c.unmap_ops,
            &c.unmap_bytes,
            &c.wz_ops,
            &c.wz_bytes,
            &c.flush_ops,
            &c.errors,
            &c.retries,
            &c.rejected,
        ] {
            cell.set(0);
        }
    }

    /// Submit a request: validated, counted, transient failures retried.
    pub fn submit(self: &Rc<Self>, req: IoRequest) -> ChannelIo {
        if let Err(e) = validate(self.info(), &req) {
            bump(&self.stats.rejected, 1);
            return ChannelIo {
                chan: None,
                io: Some(IoFuture::ready(IoCompletion::err(e, req.buf))),
                params: (IoType::Flush, 0, 0, false),
                retry: None,
            };
        }
        let len = req.len;
        let st = &self.stats;
        match req.io_type {
            IoType::Read => {
                bump(&st.read_ops, 1);
                bump(&st.read_bytes, len);
            }
            IoType::Write => {
                bump(&st.write_ops, 1);
                bump(&st.write_bytes, len);
            }
            IoType::Unmap => {
                bump(&st.unmap_ops, 1);
                bump(&st.unmap_bytes, len);
            }
            IoType::WriteZeroes => {
                bump(&st.wz_ops, 1);
                bump(&st.wz_bytes, len);
            }
            IoType::Flush => bump(&st.flush_ops, 1),
        }
        let (io_type, offset, fua) = (req.io_type, req.offset, req.fua);
        let fut = self.inner.submit(req);
        ChannelIo { chan: Some(self.clone()), io: Some(fut), params: (io_type, offset, len, fua), retry: None }
    }

    pub fn read(self: &Rc<Self>, offset: u64, buf: IoBuf) -> ChannelIo {
        self.submit(IoRequest::read(offset, buf))
    }
    pub fn write(self: &Rc<Self>, offset: u64, buf: IoBuf, fua: bool) -> ChannelIo {
        self.submit(IoRequest::write(offset, buf, fua))
    }
    pub fn flush(self: &Rc<Self>) -> ChannelIo {
        self.submit(IoRequest::flush())
    }
    pub fn unmap(self: &Rc<Self>, offset: u64, len: u64) -> ChannelIo {
        self.submit(IoRequest::unmap(offset, len))
    }
    pub fn write_zeroes(self: &Rc<Self>, offset: u64, len: u64) -> ChannelIo {
        self.submit(IoRequest::write_zeroes(offset, len))
    }
}

struct Retry {
    started: Instant,
    backoff: Duration,
    sleep: Option<Sleep>,
    buf: Option<IoBuf>,
}

/// An I/O on an [`IoChannel`]. Kept small (it is moved on every submit): the retry state
/// lives in a box that only transient failures allocate.
pub struct ChannelIo {
    /// None for requests rejected by validation (their completion is in `io`).
    chan: Option<Rc<IoChannel>>,
    io: Option<IoFuture>,
    params: (IoType, u64, u64, bool),
    retry: Option<Box<Retry>>,
}

impl Future for ChannelIo {
    type Output = IoCompletion;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoCompletion> {
        let this = &mut *self;
        loop {
            if let Some(io) = this.io.as_mut() {
                let c = match Pin::new(io).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(c) => c,
                };
                this.io = None;
                let Some(chan) = this.chan.as_ref() else { return Poll::Ready(c) };
                match c.status {
                    Err(e) if e.is_transient() => {
                        let r = this.retry.get_or_insert_with(|| {
                            Box::new(Retry { started: Instant::now(), backoff: BACKOFF_MIN, sleep: None, buf: None })
                        });
                        if r.started.elapsed() >= TRANSIENT_RETRY_LIMIT {
                            bump(&chan.stats.errors, 1);
                            log::warn!(
                                "{}: transient {e} persisted for {:?}; reporting it",
                                chan.info().name,
                                TRANSIENT_RETRY_LIMIT
                            );
                            return Poll::Ready(IoCompletion::err(e, c.buf));
                        }
                        bump(&chan.stats.retries, 1);
                        r.buf = c.buf;
                        r.sleep = Some(if reactor::current().is_some() {
                            reactor::sleep(r.backoff)
                        } else {
                            Sleep::new(Instant::now())
                        });
                        r.backoff = (r.backoff * 2).min(BACKOFF_MAX);
                    }
                    Err(_) => {
                        bump(&chan.stats.errors, 1);
                        return Poll::Ready(c);
                    }
                    Ok(()) => return Poll::Ready(c),
                }
            }
            // Waiting out a backoff before resubmitting.
            let r = this.retry.as_mut().expect("retry state after a transient error");
            if let Some(s) = r.sleep.as_mut() {
                if Pin::new(s).poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            r.sleep = None;
            let (io_type, offset, len, fua) = this.params;
            let req = IoRequest { io_type, offset, len, buf: r.buf.take(), fua };
            let chan = this.chan.as_ref().expect("channel present while retrying");
            this.io = Some(chan.inner.submit(req));
        }
    }
}
