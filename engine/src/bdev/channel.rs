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

/// The validated, counted, retrying I/O path to one bdev on one reactor.
pub struct IoChannel {
    bdev: Arc<dyn Bdev>,
    inner: Box<dyn BdevChannel>,
    stats: Cell<IoStats>,
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
        Ok(IoChannel { bdev, inner, stats: Cell::new(IoStats::default()) })
    }

    pub fn info(&self) -> &BdevInfo {
        self.bdev.info()
    }

    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    pub fn stats(&self) -> IoStats {
        self.stats.get()
    }

    pub fn reset_stats(&self) {
        self.stats.set(IoStats::default());
    }

    fn count(&self, f: impl FnOnce(&mut IoStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Submit a request: validated, counted, transient failures retried.
    pub fn submit(self: &Rc<Self>, req: IoRequest) -> ChannelIo {
        if let Err(e) = validate(self.info(), &req) {
            self.count(|s| s.num_rejected += 1);
            return ChannelIo::rejected(e, req.buf);
        }
        let len = req.len;
        self.count(|s| match req.io_type {
            IoType::Read => {
                s.num_read_ops += 1;
                s.bytes_read += len;
            }
            IoType::Write => {
                s.num_write_ops += 1;
                s.bytes_written += len;
            }
            IoType::Unmap => {
                s.num_unmap_ops += 1;
                s.bytes_unmapped += len;
            }
            IoType::WriteZeroes => {
                s.num_write_zeroes_ops += 1;
                s.bytes_write_zeroes += len;
            }
            IoType::Flush => s.num_flush_ops += 1,
        });
        let (io_type, offset, fua) = (req.io_type, req.offset, req.fua);
        let fut = self.inner.submit(req);
        ChannelIo {
            chan: Some(self.clone()),
            io: Some(fut),
            params: (io_type, offset, len, fua),
            retry: None,
            rejected: None,
        }
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

/// An I/O on an [`IoChannel`].
pub struct ChannelIo {
    chan: Option<Rc<IoChannel>>,
    io: Option<IoFuture>,
    params: (IoType, u64, u64, bool),
    retry: Option<Retry>,
    rejected: Option<IoCompletion>,
}

impl ChannelIo {
    fn rejected(e: Errno, buf: Option<IoBuf>) -> ChannelIo {
        ChannelIo {
            chan: None,
            io: None,
            params: (IoType::Flush, 0, 0, false),
            retry: None,
            rejected: Some(IoCompletion::err(e, buf)),
        }
    }
}

impl Future for ChannelIo {
    type Output = IoCompletion;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoCompletion> {
        let this = &mut *self;
        if let Some(c) = this.rejected.take() {
            return Poll::Ready(c);
        }
        loop {
            if let Some(io) = this.io.as_mut() {
                let c = match Pin::new(io).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(c) => c,
                };
                this.io = None;
                let chan = this.chan.as_ref().expect("channel present while I/O runs");
                match c.status {
                    Err(e) if e.is_transient() => {
                        let r = this.retry.get_or_insert_with(|| Retry {
                            started: Instant::now(),
                            backoff: BACKOFF_MIN,
                            sleep: None,
                            buf: None,
                        });
                        if r.started.elapsed() >= TRANSIENT_RETRY_LIMIT {
                            chan.count(|s| s.num_errors += 1);
                            log::warn!(
                                "{}: transient {e} persisted for {:?}; reporting it",
                                chan.info().name,
                                TRANSIENT_RETRY_LIMIT
                            );
                            return Poll::Ready(IoCompletion::err(e, c.buf));
                        }
                        chan.count(|s| s.num_retries += 1);
                        r.buf = c.buf;
                        r.sleep = Some(if reactor::current().is_some() {
                            reactor::sleep(r.backoff)
                        } else {
                            Sleep::new(Instant::now())
                        });
                        r.backoff = (r.backoff * 2).min(BACKOFF_MAX);
                    }
                    Err(_) => {
                        chan.count(|s| s.num_errors += 1);
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
