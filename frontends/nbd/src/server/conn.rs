//! One client connection: handshake, then the transmission phase.
//!
//! The connection task is the *reader*: it receives into a 128 KiB buffer,
//! decodes requests, and starts each one on the export's [`IoChannel`]. A
//! started I/O is polled once right away (a RAM-backed bdev completes there
//! and then, with no task created); if it is still pending it becomes a task
//! of its own. Completions queue a [`Reply`] for the *writer* task, the only
//! one that sends on the socket: it batches queued replies into one send
//! buffer (small read payloads are copied in; large ones are sent straight
//! from their I/O buffer after the header), so there is never more than one
//! send in flight and replies go out in completion order.
//!
//! Write payloads are copied from the receive buffer when they are already
//! there, and otherwise received directly into the write's own I/O buffer.
//!
//! Bounds: [`MAX_IN_FLIGHT`] requests and [`MAX_IN_FLIGHT_BYTES`] of read and
//! write payload per connection, counted from the moment a request is
//! admitted until its reply has been sent; the reader waits for room before
//! admitting a request (and so before receiving a write payload).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tiercache_engine::bdev::{ChannelIo, IoChannel, IoCompletion, IoType};
use tiercache_engine::reactor::{self, net, Sleep};
use tiercache_engine::{Errno, IoBuf};

use super::{lock, Catalog, ConnCtl, Shared, CLOSE_TIMEOUT};
use crate::handshake::{Handshake, HandshakeState};
use crate::proto::{Command, NbdError};
use crate::transmission::{error_chunk, offset_data_header, simple_reply, Event, Request, RequestDecoder};

/// Requests admitted and not yet answered, per connection.
pub const MAX_IN_FLIGHT: usize = 128;
/// Read and write payload bytes admitted and not yet answered, per connection
/// (a single request up to the 32 MiB maximum is always admitted when the
/// connection is otherwise idle).
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

const RECV_BUF: usize = 128 << 10;
/// The writer's header buffer (payloads are sent from their own buffers).
const SEND_BUF: usize = 16 << 10;
/// A write payload with at least this much still to come is received
/// directly into its buffer.
const DIRECT_RECV_MIN: usize = 16 << 10;
/// A closing connection with nothing in flight closes after this long
/// without receiving anything.
const CLOSE_QUIET: Duration = Duration::from_millis(20);
/// Reply coalescing: at most this many replies are gathered per send ...
const COALESCE_MAX: usize = 16;
/// ... or this many read payload bytes (large replies gain nothing from waiting) ...
const COALESCE_BYTES: usize = 64 << 10;
/// ... and a reply waits at most this long for others to join it.
const COALESCE_HOLD: Duration = Duration::from_micros(100);
/// A reader on TCP whose client keeps a deep pipeline (coalescing target at least
/// `RECV_HOLD_MIN_TARGET`) waits this long before each receive. Not on a Unix socket:
/// there the same hold cost 25–35% of fio's 4K IOPS (150–180k against 220–245k without
/// it, docs/benchmarks.md, NBD, session 6), while on TCP, dropping it costs 30–80% more
/// server CPU per I/O.
const RECV_HOLD: Duration = Duration::from_micros(40);
const RECV_HOLD_MIN_TARGET: usize = 4;
/// Requests moving more than this many bytes are neither held nor make replies wait.
const HOLD_MAX_IO: usize = 16 << 10;
/// Admissions per window of the peak in-flight tracking.
const PEAK_WINDOW: u32 = 1024;
/// After the final reply, how long to wait for the client to close its end.
const LINGER: Duration = Duration::from_millis(500);

enum Head {
    Fixed([u8; 28], u8),
    Vec(Vec<u8>),
}

impl Head {
    fn bytes(&self) -> &[u8] {
        match self {
            Head::Fixed(b, n) => &b[..usize::from(*n)],
            Head::Vec(v) => v,
        }
    }

    fn simple(cookie: crate::proto::Cookie, err: Option<NbdError>) -> Head {
        let mut b = [0u8; 28];
        b[..16].copy_from_slice(&simple_reply(cookie, err));
        Head::Fixed(b, 16)
    }
}

/// One reply waiting for the writer.
struct Reply {
    head: Head,
    data: Option<IoBuf>,
    /// Payload bytes released when it has been sent.
    cost: usize,
}

#[derive(Default)]
struct Out {
    queue: VecDeque<Reply>,
    /// Read payload bytes in `queue`.
    bytes: usize,
    writer: Option<Waker>,
}

/// Transmission-phase state shared by the reader, the writer and the
/// request tasks (all on this reactor).
struct Conn {
    ctl: Arc<ConnCtl>,
    fd: RawFd,
    structured: bool,
    chan: Rc<IoChannel>,
    flush_supported: bool,
    out: RefCell<Out>,
    in_flight: Cell<usize>,
    in_flight_bytes: Cell<usize>,
    reader: RefCell<Option<Waker>>,
    /// The socket failed: replies are dropped.
    dead: Cell<bool>,
    /// The reader is done: the writer exits when its queue is empty.
    writer_stop: Cell<bool>,
    /// Reply coalescing: the deepest in-flight count seen recently, and the current
    /// window's peak and admissions (see [`Conn::admit`]).
    peak_in_flight: Cell<usize>,
    window_peak: Cell<usize>,
    window_admits: Cell<u32>,
    /// The last admitted request moved at most [`HOLD_MAX_IO`] bytes.
    small_io: Cell<bool>,
    /// Hold receives for a deep pipeline ([`RECV_HOLD`]): TCP connections only.
    recv_hold: bool,
}

impl Conn {
    fn push(&self, r: Reply) {
        let w = {
            let mut o = self.out.borrow_mut();
            o.bytes += r.data.as_ref().map_or(0, |d| d.len());
            o.queue.push_back(r);
            // While the queue is below the coalescing target the writer only waits for
            // its hold timer; waking it for each reply would be a wasted poll.
            if o.queue.len() >= self.coalesce_target() || o.bytes >= COALESCE_BYTES || o.queue.len() == 1 {
                o.writer.take()
            } else {
                None
            }
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    /// How many replies the writer gathers before it sends: a quarter of the deepest
    /// pipeline the client kept recently (at most [`COALESCE_MAX`]), so a client with
    /// few requests outstanding (queue depth 1–7) is answered at once, and one that
    /// keeps many outstanding still has three quarters of them to work on while the
    /// held replies gather. Each send then carries several replies, and the client
    /// reads several per wake-up instead of sleeping in `poll` once per reply.
    ///
    /// Only for small I/O (the last request moved at most [`HOLD_MAX_IO`] bytes): a
    /// large request is a receive or a send of its own anyway, and holding it only
    /// adds latency (a 40 µs receive hold before each 128K write capped it at ~10k IOPS).
    fn coalesce_target(&self) -> usize {
        if !self.small_io.get() {
            return 1;
        }
        (self.peak_in_flight.get() / 4).clamp(1, COALESCE_MAX)
    }

    fn release(&self, n: usize, bytes: usize) {
        self.in_flight.set(self.in_flight.get() - n);
        self.in_flight_bytes.set(self.in_flight_bytes.get() - bytes);
        let w = self.reader.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }

    fn admit(&self, cost: usize) {
        self.small_io.set(cost <= HOLD_MAX_IO);
        let n = self.in_flight.get() + 1;
        self.in_flight.set(n);
        self.in_flight_bytes.set(self.in_flight_bytes.get() + cost);
        // Peak in-flight count: rises at once, falls to the last window's peak every
        // PEAK_WINDOW admissions (so a client that lowers its queue depth is followed).
        let wp = self.window_peak.get().max(n);
        let admits = self.window_admits.get() + 1;
        if admits >= PEAK_WINDOW {
            self.peak_in_flight.set(wp);
            self.window_peak.set(n);
            self.window_admits.set(0);
        } else {
            self.peak_in_flight.set(self.peak_in_flight.get().max(n));
            self.window_peak.set(wp);
            self.window_admits.set(admits);
        }
    }

    fn has_room(&self, cost: usize) -> bool {
        let n = self.in_flight.get();
        n == 0 || (n < MAX_IN_FLIGHT && self.in_flight_bytes.get() + cost <= MAX_IN_FLIGHT_BYTES)
    }

    fn mark_dead(&self) {
        if !self.dead.replace(true) {
            self.ctl.sock.shutdown(Shutdown::Both);
        }
    }

    fn error_reply(&self, cookie: crate::proto::Cookie, err: NbdError, msg: &str, cost: usize) -> Reply {
        let head = if self.structured {
            let mut v = Vec::with_capacity(32 + msg.len());
            error_chunk(&mut v, cookie, err, msg, true);
            Head::Vec(v)
        } else {
            Head::simple(cookie, Some(err))
        };
        Reply { head, data: None, cost }
    }

    /// The reply for a finished request.
    fn reply(&self, req: &Request, c: IoCompletion) -> Reply {
        let cost = cost_of(req);
        match c.status {
            Err(e) => {
                let err = NbdError::from_errno(e.0);
                let msg = format!("{:?} at {}+{} failed: {e}", req.command, req.offset, req.length);
                self.error_reply(req.cookie, err, &msg, cost)
            }
            Ok(()) if req.command == Command::Read => {
                let data = c.buf.filter(|b| b.len() == req.length as usize);
                let Some(data) = data else {
                    return self.error_reply(req.cookie, NbdError::Io, "read returned no data", cost);
                };
                let head = if self.structured {
                    match offset_data_header(req.cookie, req.offset, req.length, true) {
                        Ok(h) => Head::Fixed(h, 28),
                        Err(_) => return self.error_reply(req.cookie, NbdError::Io, "cannot encode reply", cost),
                    }
                } else {
                    Head::simple(req.cookie, None)
                };
                Reply { head, data: Some(data), cost }
            }
            Ok(()) => Reply { head: Head::simple(req.cookie, None), data: None, cost },
        }
    }
}

fn cost_of(req: &Request) -> usize {
    match req.command {
        Command::Read | Command::Write => req.length as usize,
        _ => 0,
    }
}

/// A started request: a channel I/O, a multi-step one, or an immediate result.
// The common case (a ChannelIo) is stored inline: boxing it would cost an
// allocation per request.
#[allow(clippy::large_enum_variant)]
enum Exec {
    Io(ChannelIo),
    Boxed(Pin<Box<dyn Future<Output = IoCompletion>>>),
    Done(Option<IoCompletion>),
}

impl Future for Exec {
    type Output = IoCompletion;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoCompletion> {
        match &mut *self {
            Exec::Io(io) => Pin::new(io).poll(cx),
            Exec::Boxed(f) => f.as_mut().poll(cx),
            Exec::Done(c) => Poll::Ready(c.take().unwrap_or_else(|| IoCompletion::err(Errno::EIO, None))),
        }
    }
}

/// Then flush, for FUA on commands the bdev has no FUA flag for.
fn with_flush(chan: &Rc<IoChannel>, first: ChannelIo) -> Exec {
    let chan = chan.clone();
    Exec::Boxed(Box::pin(async move {
        let c = first.await;
        if c.status.is_err() {
            return c;
        }
        chan.flush().await
    }))
}

fn start(conn: &Conn, req: &Request, payload: Option<IoBuf>) -> Exec {
    let ch = &conn.chan;
    let (off, len) = (req.offset, u64::from(req.length));
    let fua_flush = req.fua() && conn.flush_supported;
    match req.command {
        Command::Read => Exec::Io(ch.read(off, IoBuf::new(req.length as usize))),
        Command::Write => match payload {
            Some(buf) => Exec::Io(ch.write(off, buf, req.fua())),
            None => Exec::Done(Some(IoCompletion::err(Errno::EIO, None))),
        },
        Command::Flush if conn.flush_supported => Exec::Io(ch.flush()),
        Command::Trim if fua_flush => with_flush(ch, ch.unmap(off, len)),
        Command::Trim => Exec::Io(ch.unmap(off, len)),
        // NO_HOLE asks for allocated zeroes; write_zeroes is what we have either way.
        Command::WriteZeroes if fua_flush => with_flush(ch, ch.write_zeroes(off, len)),
        Command::WriteZeroes => Exec::Io(ch.write_zeroes(off, len)),
        // Flush on a bdev without a volatile cache, CACHE (a prefetch hint).
        _ => Exec::Done(Some(IoCompletion::ok(None))),
    }
}

/// Start a request, poll it once inline, and leave it to a task of its own
/// only if it is still pending.
async fn dispatch(conn: &Rc<Conn>, req: Request, payload: Option<IoBuf>) {
    let mut exec = start(conn, &req, payload);
    let first = poll_fn(|cx| Poll::Ready(Pin::new(&mut exec).poll(cx))).await;
    match first {
        Poll::Ready(c) => conn.push(conn.reply(&req, c)),
        Poll::Pending => {
            let conn = conn.clone();
            reactor::spawn_detached(async move {
                let c = exec.await;
                conn.push(conn.reply(&req, c));
            });
        }
    }
}

/// Send `total` bytes of `owned` completely, one `send(owned, bytes_sent_so_far)` after
/// another (short sends and EINTR/EAGAIN continue; 0 bytes is EPIPE). `owned` always
/// comes back.
async fn send_fully<T, F>(mut owned: T, total: usize, mut send: impl FnMut(T, usize) -> F) -> (Result<(), Errno>, T)
where
    F: std::future::Future<Output = (Result<usize, Errno>, T)>,
{
    let mut at = 0;
    while at < total {
        let (r, back) = send(owned, at).await;
        owned = back;
        match r {
            Ok(0) => return (Err(Errno(libc::EPIPE)), owned),
            Ok(n) => at += n,
            Err(e) if e == Errno::EINTR || e == Errno::EAGAIN => {}
            Err(e) => return (Err(e), owned),
        }
    }
    (Ok(()), owned)
}

/// Send `buf[..len]` completely. The buffer always comes back.
async fn send_all(fd: RawFd, mut buf: IoBuf, len: usize) -> (Result<(), Errno>, IoBuf) {
    let full = buf.len();
    buf.set_len(len);
    let (res, mut buf) = send_fully(buf, len, |b, at| net::send(fd, b, at)).await;
    buf.set_len(full);
    (res, buf)
}

/// Send everything queued in `v` (as many `sendmsg`s as it takes), then
/// drop its buffers but the first (the header buffer), which is returned.
async fn send_vecs(fd: RawFd, v: net::IoVecs) -> (Result<(), Errno>, net::IoVecs, Option<IoBuf>) {
    let total = v.total();
    let (res, mut v) = send_fully(v, total, |v, at| net::sendv(fd, v, at)).await;
    let first = v.clear().next();
    (res, v, first)
}

/// The writer task: replies go out with one `sendmsg` per batch — headers
/// gathered in one buffer, each read payload sent from its own I/O buffer
/// (no copy), so a 128K read reply is one send, not two.
async fn writer(conn: Rc<Conn>) {
    let mut v = net::IoVecs::new();
    let mut sbuf = Some(IoBuf::new(SEND_BUF));
    let mut batch: VecDeque<Reply> = VecDeque::new();
    let mut hold: Option<Sleep> = None;
    loop {
        let more = poll_fn(|cx| {
            let mut o = conn.out.borrow_mut();
            if o.queue.is_empty() {
                if conn.writer_stop.get() {
                    return Poll::Ready(false);
                }
                o.writer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            // Reply coalescing (see `Conn::coalesce_target`): hold the queue until it is
            // big enough or the hold timer expires.
            let full = o.queue.len() >= conn.coalesce_target() || o.bytes >= COALESCE_BYTES;
            if !full && !conn.writer_stop.get() && !conn.ctl.is_closing() {
                let h = hold.get_or_insert_with(|| reactor::sleep(COALESCE_HOLD));
                if Pin::new(h).poll(cx).is_pending() {
                    o.writer = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
            hold = None;
            o.bytes = 0;
            std::mem::swap(&mut o.queue, &mut batch);
            Poll::Ready(true)
        })
        .await;
        if !more {
            break;
        }
        let (mut n, mut bytes) = (0usize, 0usize);
        let mut fill = 0usize;
        let mut hidx = v.push_buf(sbuf.take().unwrap_or_else(|| IoBuf::new(SEND_BUF)));
        while let Some(r) = batch.pop_front() {
            if !conn.dead.get() {
                let head = r.head.bytes();
                let big_head = head.len() > SEND_BUF;
                // Room for this reply: its header in the header buffer, two pieces.
                if (!big_head && fill + head.len() > SEND_BUF) || v.segs() + 2 > net::MAX_IOVECS {
                    let (res, back, hb) = send_vecs(conn.fd, v).await;
                    v = back;
                    fill = 0;
                    hidx = v.push_buf(hb.unwrap_or_else(|| IoBuf::new(SEND_BUF)));
                    if res.is_err() {
                        conn.mark_dead();
                    }
                    conn.release(n, bytes);
                    (n, bytes) = (0, 0);
                }
                let mut ok = true;
                if big_head {
                    // Only an error chunk with a huge message could.
                    let i = v.push_buf(IoBuf::from_slice(head));
                    ok &= v.push_seg(i, 0, head.len());
                } else if let Some(hb) = v.buf_mut(hidx) {
                    hb[fill..fill + head.len()].copy_from_slice(head);
                    ok &= v.push_seg(hidx, fill, head.len());
                    fill += head.len();
                }
                if let Some(d) = r.data {
                    let len = d.len();
                    let i = v.push_buf(d);
                    ok &= v.push_seg(i, 0, len);
                }
                if !ok {
                    // Cannot happen (room was checked); never send a torn reply.
                    conn.mark_dead();
                }
            }
            n += 1;
            bytes += r.cost;
            // Release early so the reader can admit more while we keep sending.
            if n >= 32 && !conn.dead.get() {
                let (res, back, hb) = send_vecs(conn.fd, v).await;
                v = back;
                fill = 0;
                hidx = v.push_buf(hb.unwrap_or_else(|| IoBuf::new(SEND_BUF)));
                if res.is_err() {
                    conn.mark_dead();
                }
                conn.release(n, bytes);
                (n, bytes) = (0, 0);
            }
        }
        let hb = if v.total() > 0 && !conn.dead.get() {
            let (res, back, hb) = send_vecs(conn.fd, v).await;
            v = back;
            if res.is_err() {
                conn.mark_dead();
            }
            hb
        } else {
            v.clear().next()
        };
        sbuf = hb;
        conn.release(n, bytes);
    }
}

/// What woke the reader.
enum Wake {
    Data(Result<usize, Errno>, IoBuf),
    Control,
    Timeout,
}

/// Wait for the pending receive, a control signal (`closing` first seen, or
/// `force`), the in-flight count changing (if `watch_in_flight`), or `sleep`.
async fn wait(
    ctl: &ConnCtl,
    conn: Option<&Conn>,
    op: &mut net::BufOp,
    closing_seen: bool,
    sleep: Option<&mut Sleep>,
) -> Wake {
    let mut sleep = sleep;
    let start_in_flight = conn.map(|c| c.in_flight.get());
    poll_fn(|cx| {
        let signalled =
            |ctl: &ConnCtl| ctl.force.load(std::sync::atomic::Ordering::Acquire) || (!closing_seen && ctl.is_closing());
        if signalled(ctl) {
            return Poll::Ready(Wake::Control);
        }
        if let Poll::Ready((r, b)) = Pin::new(&mut *op).poll(cx) {
            return Poll::Ready(Wake::Data(r, b));
        }
        if let Some(s) = sleep.as_deref_mut() {
            if Pin::new(s).poll(cx).is_ready() {
                return Poll::Ready(Wake::Timeout);
            }
        }
        if let (Some(c), Some(n0)) = (conn, start_in_flight) {
            if c.in_flight.get() != n0 {
                return Poll::Ready(Wake::Control);
            }
            *c.reader.borrow_mut() = Some(cx.waker().clone());
        }
        {
            let mut w = lock(&ctl.waker);
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        // Re-check after registering: a signal may have raced the registration.
        if signalled(ctl) {
            return Poll::Ready(Wake::Control);
        }
        Poll::Pending
    })
    .await
}

/// Wait until `cond` holds (re-checked on every wake of the reader), a
/// control signal, or `deadline`.
async fn wait_until(conn: &Conn, deadline: Option<Instant>, cond: impl Fn(&Conn) -> bool) {
    let mut sleep = deadline.map(|d| reactor::sleep(d.saturating_duration_since(Instant::now())));
    poll_fn(|cx| {
        if cond(conn) || conn.ctl.force.load(std::sync::atomic::Ordering::Acquire) {
            return Poll::Ready(());
        }
        if let Some(s) = sleep.as_mut() {
            if Pin::new(s).poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        *conn.reader.borrow_mut() = Some(cx.waker().clone());
        *lock(&conn.ctl.waker) = Some(cx.waker().clone());
        if conn.ctl.force.load(std::sync::atomic::Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await
}

/// Receive buffer with a valid window `[start, end)`.
struct RecvBuf {
    buf: Option<IoBuf>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    fn data(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b[self.start..self.end])
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    /// Move the window to the front so the free tail is as large as possible.
    fn compact(&mut self) {
        if let Some(b) = self.buf.as_mut() {
            if self.start > 0 {
                b.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
        }
    }
}

/// Where the in-flight receive writes.
enum RecvInto {
    Main,
    Payload,
}

/// A write whose payload is being received.
struct PendingWrite {
    req: Request,
    /// None while a direct receive into it is in flight, or when discarding.
    buf: Option<IoBuf>,
    filled: usize,
    /// Answered with ESHUTDOWN: the payload is read and dropped.
    discard: bool,
}

impl PendingWrite {
    fn remaining(&self) -> usize {
        self.req.length as usize - self.filled
    }
}

pub(crate) async fn run(shared: Arc<Shared>, ctl: Arc<ConnCtl>) {
    let id = ctl.id;
    if let Err(why) = serve(&shared, &ctl).await {
        log::debug!("nbd: connection {id}: {why}");
    }
    // Also completes any receive still queued in the ring (it holds the socket
    // open, so dropping our descriptor alone would not close the connection).
    ctl.sock.shutdown(Shutdown::Both);
    *lock(&ctl.waker) = None;
    shared.unregister_conn(id);
}

async fn serve(shared: &Arc<Shared>, ctl: &Arc<ConnCtl>) -> Result<(), String> {
    let fd = ctl.sock.fd();
    let mut rb = RecvBuf { buf: Some(IoBuf::new(RECV_BUF)), start: 0, end: 0 };
    let mut pending: Option<net::BufOp> = None;

    // ---- handshake ----
    let mut hs = Handshake::new(Catalog(shared.clone()));
    if shared.stopping.load(std::sync::atomic::Ordering::Acquire) {
        hs.begin_shutdown();
    }
    let mut out = IoBuf::new(4096);
    let negotiated = loop {
        while !hs.output().is_empty() {
            let n = hs.output().len().min(out.len());
            out[..n].copy_from_slice(&hs.output()[..n]);
            let (r, b) = send_all(fd, out, n).await;
            out = b;
            r.map_err(|e| format!("handshake send: {e}"))?;
            hs.consume_output(n);
        }
        match hs.state() {
            HandshakeState::Negotiated(n) => break n.clone(),
            HandshakeState::Aborted => return Ok(()),
            HandshakeState::Failed(e) => return Err(format!("handshake failed: {e}")),
            _ => {}
        }
        if !rb.is_empty() {
            let used = hs.feed(rb.data());
            rb.start += used;
            if used == 0 && !hs.is_finished() {
                return Err("handshake made no progress".into());
            }
            continue;
        }
        if ctl.is_closing() {
            return Err("closed during handshake".into());
        }
        let buf = rb.buf.take().ok_or("receive buffer lost")?;
        rb.start = 0;
        rb.end = 0;
        let op = pending.insert(net::recv(fd, buf, 0));
        match wait(ctl, None, op, false, None).await {
            Wake::Data(r, b) => {
                pending = None;
                rb.buf = Some(b);
                match r {
                    Ok(0) => return Err("client closed during handshake".into()),
                    Ok(n) => rb.end = n,
                    Err(e) if e == Errno::EINTR || e == Errno::EAGAIN => {}
                    Err(e) => return Err(format!("handshake recv: {e}")),
                }
            }
            Wake::Control | Wake::Timeout => return Err("closed during handshake".into()),
        }
    };
    drop(hs);
    drop(out);

    let Some(export) = shared.attach(ctl, &negotiated.export) else {
        return Err(format!("export {:?} went away during the handshake", negotiated.export.name));
    };
    let chan = export.desc.channel().map_err(|e| format!("no I/O channel for {}: {e}", export.desc.name()))?;
    let flush_supported = chan.info().io_types.contains(IoType::Flush);
    log::debug!(
        "nbd: connection {} on reactor {:?}: export {:?}, structured replies {}",
        ctl.id,
        reactor::current(),
        export.name,
        negotiated.structured_replies
    );
    let conn = Rc::new(Conn {
        ctl: ctl.clone(),
        fd,
        structured: negotiated.structured_replies,
        chan,
        flush_supported,
        out: RefCell::new(Out::default()),
        in_flight: Cell::new(0),
        in_flight_bytes: Cell::new(0),
        reader: RefCell::new(None),
        dead: Cell::new(false),
        writer_stop: Cell::new(false),
        peak_in_flight: Cell::new(0),
        window_peak: Cell::new(0),
        window_admits: Cell::new(0),
        small_io: Cell::new(true),
        recv_hold: matches!(ctl.sock, super::Sock::Tcp(_)),
    });
    let writer_task = reactor::spawn(writer(conn.clone()));
    let mut cur = None;
    let res = transmission(&conn, negotiated.export_config(), rb, &mut cur).await;
    if let Some(w) = cur.take() {
        // Admitted, but its payload never fully arrived: nothing will answer it.
        if !w.discard {
            conn.release(1, cost_of(&w.req));
        }
    }

    // Every admitted request is answered (or the socket is dead / forced).
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    wait_until(&conn, Some(deadline), |c| c.in_flight.get() == 0 || c.dead.get()).await;
    conn.writer_stop.set(true);
    if let Some(w) = conn.out.borrow_mut().writer.take() {
        w.wake();
    }
    let forced = ctl.force.load(std::sync::atomic::Ordering::Acquire) || conn.in_flight.get() > 0;
    if !forced {
        writer_task.await;
    }
    if !conn.dead.get() && !forced {
        // Clean close: FIN after the last reply, then give the client a moment
        // to close its end (closing with unread input would send a reset).
        ctl.sock.shutdown(Shutdown::Write);
        linger(ctl, res.as_ref().err().map_or(LINGER, |_| Duration::ZERO)).await;
    } else {
        ctl.sock.shutdown(Shutdown::Both);
    }
    res
}

async fn linger(ctl: &ConnCtl, d: Duration) {
    if d.is_zero() {
        return;
    }
    let fd = ctl.sock.fd();
    let deadline = Instant::now() + d;
    let mut buf = IoBuf::new(16 << 10);
    while Instant::now() < deadline {
        let mut op = net::recv(fd, buf, 0);
        let mut sleep = reactor::sleep(deadline.saturating_duration_since(Instant::now()));
        match wait(ctl, None, &mut op, true, Some(&mut sleep)).await {
            Wake::Data(Ok(n), b) if n > 0 => buf = b,
            _ => return,
        }
    }
}

/// The request loop. Returns when the client disconnects (DISC or EOF), the
/// connection is closed by the server, or on a protocol violation / socket
/// error (Err).
async fn transmission(
    conn: &Rc<Conn>,
    cfg: crate::transmission::ExportConfig,
    mut rb: RecvBuf,
    cur: &mut Option<PendingWrite>,
) -> Result<(), String> {
    let ctl = &conn.ctl;
    let fd = conn.fd;
    let mut decoder = RequestDecoder::new(cfg);
    let mut pending: Option<(net::BufOp, RecvInto)> = None;
    let mut closing_since: Option<Instant> = None;
    let mut last_rx = Instant::now();
    loop {
        if ctl.force.load(std::sync::atomic::Ordering::Acquire) || conn.dead.get() {
            return Err("connection closed by the server (forced) or socket failed".into());
        }
        if closing_since.is_none() && ctl.is_closing() {
            closing_since = Some(Instant::now());
        }

        // ---- consume buffered input ----
        loop {
            if let Some(w) = cur.as_mut() {
                if rb.is_empty() {
                    break;
                }
                let take = w.remaining().min(rb.end - rb.start);
                if let (Some(dst), Some(src)) = (w.buf.as_mut(), rb.buf.as_ref()) {
                    dst[w.filled..w.filled + take].copy_from_slice(&src[rb.start..rb.start + take]);
                }
                decoder.advance_payload(take);
                rb.start += take;
                w.filled += take;
                if w.remaining() == 0 {
                    let w = cur.take().ok_or("lost pending write")?;
                    if !w.discard {
                        dispatch(conn, w.req, w.buf).await;
                    }
                }
                continue;
            }
            if rb.is_empty() {
                break;
            }
            let d = match rb.buf.as_ref() {
                Some(b) => decoder.decode(&b[rb.start..rb.end]),
                None => return Err("receive buffer lost".into()),
            };
            let d = d.map_err(|v| format!("protocol violation: {v}"))?;
            rb.start += d.consumed;
            match d.event {
                None => break,
                Some(Event::Request(req)) => {
                    let cost = cost_of(&req);
                    if closing_since.is_some() {
                        conn.admit(0);
                        conn.push(conn.error_reply(req.cookie, NbdError::Shutdown, "server is shutting down", 0));
                        if req.command == Command::Write {
                            *cur = Some(PendingWrite { req, buf: None, filled: 0, discard: true });
                        }
                        continue;
                    }
                    if !conn.has_room(cost) {
                        wait_until(conn, None, |c| c.has_room(cost)).await;
                    }
                    conn.admit(cost);
                    if req.command == Command::Write {
                        let buf = IoBuf::new(req.length as usize);
                        *cur = Some(PendingWrite { req, buf: Some(buf), filled: 0, discard: false });
                    } else {
                        dispatch(conn, req, None).await;
                    }
                }
                Some(Event::Rejected(rej)) => {
                    if !conn.has_room(0) {
                        wait_until(conn, None, |c| c.has_room(0)).await;
                    }
                    conn.admit(0);
                    let msg = rej.reason.to_string();
                    conn.push(conn.error_reply(rej.cookie, rej.error, &msg, 0));
                }
                Some(Event::WriteData { .. }) => {
                    // Payloads are taken with advance_payload before decoding.
                    return Err("unexpected write payload event".into());
                }
                Some(Event::Disconnect) => return Ok(()),
            }
        }
        if ctl.force.load(std::sync::atomic::Ordering::Acquire) || conn.dead.get() {
            continue; // reported at the top
        }

        // ---- closing: done once idle and quiet ----
        let mut sleep = None;
        if let Some(since) = closing_since {
            let hard = since + CLOSE_TIMEOUT;
            let now = Instant::now();
            if now >= hard {
                return Err("close timeout with requests still in flight".into());
            }
            if conn.in_flight.get() == 0 {
                let quiet_end = last_rx + CLOSE_QUIET;
                if now >= quiet_end {
                    return Ok(());
                }
                sleep = Some(reactor::sleep(quiet_end.min(hard) - now));
            } else {
                sleep = Some(reactor::sleep(hard - now));
            }
        }

        // ---- receive more ----
        if conn.recv_hold
            && pending.is_none()
            && sleep.is_none()
            && cur.is_none()
            && conn.coalesce_target() >= RECV_HOLD_MIN_TARGET
        {
            // A client keeping a deep pipeline sends its requests one by one; reading each
            // as it arrives costs a receive (and a poll wake-up) per request. Let a few
            // gather first. The held replies bound how long the client can be starved.
            reactor::sleep(RECV_HOLD).await;
        }
        if pending.is_none() {
            let direct =
                cur.as_ref().is_some_and(|w| !w.discard && w.buf.is_some() && w.remaining() >= DIRECT_RECV_MIN);
            if direct && rb.is_empty() {
                let w = cur.as_mut().ok_or("lost pending write")?;
                let buf = w.buf.take().ok_or("lost write buffer")?;
                pending = Some((net::recv(fd, buf, w.filled), RecvInto::Payload));
            } else {
                rb.compact();
                let buf = rb.buf.take().ok_or("receive buffer lost")?;
                let at = rb.end;
                if at >= buf.len() {
                    return Err("receive buffer full without a complete request".into());
                }
                pending = Some((net::recv(fd, buf, at), RecvInto::Main));
            }
        }
        let Some((op, _)) = pending.as_mut() else { continue };
        let woke = wait(ctl, closing_since.map(|_| &**conn), op, closing_since.is_some(), sleep.as_mut()).await;
        let Wake::Data(r, buf) = woke else { continue };
        let Some((_, into)) = pending.take() else { continue };
        let n = match into {
            RecvInto::Main => {
                rb.buf = Some(buf);
                match r {
                    Ok(n) => {
                        rb.end += n;
                        n
                    }
                    Err(e) => return recv_failed(e),
                }
            }
            RecvInto::Payload => {
                let w = cur.as_mut().ok_or("lost pending write")?;
                w.buf = Some(buf);
                match r {
                    Ok(n) => {
                        let n = n.min(w.remaining());
                        decoder.advance_payload(n);
                        w.filled += n;
                        if w.remaining() == 0 {
                            let w = cur.take().ok_or("lost pending write")?;
                            dispatch(conn, w.req, w.buf).await;
                        }
                        n
                    }
                    Err(e) => return recv_failed(e),
                }
            }
        };
        if n == 0 {
            // EOF. A write whose payload never fully arrived is dropped.
            return Ok(());
        }
        last_rx = Instant::now();
    }
}

fn recv_failed(e: Errno) -> Result<(), String> {
    if e == Errno::EINTR || e == Errno::EAGAIN {
        // Not expected from io_uring; treat as a failed socket to stay safe.
        return Err(format!("recv: transient {e}"));
    }
    Err(format!("recv: {e}"))
}
