//! The reactor's io_uring: batched submission, completions reaped without a syscall.
//!
//! Every kernel I/O of a reactor (files, block devices, sockets, its wake-up eventfd) is an
//! operation on this ring. An operation gets a slot in a slab; the slot index is the SQE's
//! `user_data`. SQEs are pushed when the operation's future is first polled and submitted
//! in one `io_uring_enter` per poll-loop iteration (only if anything was queued);
//! completions are peeked from the shared CQ ring with no syscall at all.
//!
//! Bounds: at most `max_in_flight` (= CQ size) operations are in flight, so the completion
//! queue can never overflow; an operation that finds no room waits (backpressure, never an
//! error). Memory safety: the kernel may touch an operation's buffers until its CQE
//! arrives. The futures in this module own their buffers; if such a future is dropped
//! while its operation is in flight, it hands the buffer to the slot ([`Keep`]) and the slot
//! is freed, with the buffer, only when the CQE arrives.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use crate::dma::IoBuf;
use crate::errno::Errno;

/// `user_data` of the always-armed eventfd read that wakes a sleeping reactor.
const WAKE_TAG: u64 = u64::MAX;

/// Resources the kernel may still use after their future was dropped.
pub enum Keep {
    None,
    Buf(IoBuf),
    Any(Box<dyn std::any::Any>),
}

enum OpState {
    Pending(Option<Waker>),
    Done(i32),
    /// The future is gone; free the slot (and what it keeps) at completion.
    Orphaned,
}

struct OpSlot {
    state: OpState,
    keep: Keep,
}

/// Counters of one ring.
#[derive(Clone, Copy, Debug, Default)]
pub struct UringStats {
    pub submitted: u64,
    pub completed: u64,
    pub enter_calls: u64,
    pub backpressure_waits: u64,
}

pub(crate) struct Uring {
    ring: RefCell<IoUring>,
    ops: RefCell<Slab<OpSlot>>,
    unsubmitted: Cell<u32>,
    in_flight: Cell<u32>,
    max_in_flight: u32,
    space_waiters: RefCell<VecDeque<Waker>>,
    eventfd: RawFd,
    submit_batch: u32,
    wake_buf: Box<UnsafeCell<[u8; 8]>>,
    wake_armed: Cell<bool>,
    stats: Cell<UringStats>,
}

impl Uring {
    pub(crate) fn new(entries: u32, submit_batch: u32, defer_taskrun: bool, eventfd: RawFd) -> io::Result<Uring> {
        let entries = entries.clamp(8, 32768).next_power_of_two();
        // Completion task work runs only when this thread enters the kernel (COOP_TASKRUN),
        // and the kernel raises a flag in the SQ ring when some is pending (TASKRUN_FLAG),
        // so a busy reactor is not interrupted by IPIs for each completion: it checks the
        // flag once per iteration and enters only when needed (`flush`, whose enter then
        // carries GETEVENTS). With DEFER_TASKRUN the task work is also never run on the
        // way out of other syscalls or interrupts, only by those enters (and by `wait`).
        // Older kernels: the same without DEFER_TASKRUN, then a plain ring.
        let build = |defer: bool| {
            let mut b = IoUring::builder();
            b.setup_cqsize(entries * 2).setup_single_issuer().setup_coop_taskrun().setup_taskrun_flag();
            if defer {
                b.setup_defer_taskrun();
            }
            b.build(entries)
        };
        let ring = (if defer_taskrun { build(true) } else { Err(io::Error::from_raw_os_error(libc::EINVAL)) })
            .or_else(|_| build(false))
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 2).build(entries))?;
        let max_in_flight = entries * 2 - 1; // one CQ entry is always left for the wake read
        Ok(Uring {
            ring: RefCell::new(ring),
            ops: RefCell::new(Slab::with_capacity(max_in_flight as usize)),
            unsubmitted: Cell::new(0),
            in_flight: Cell::new(0),
            max_in_flight,
            space_waiters: RefCell::new(VecDeque::new()),
            eventfd,
            submit_batch,
            wake_buf: Box::new(UnsafeCell::new([0; 8])),
            wake_armed: Cell::new(false),
            stats: Cell::new(UringStats::default()),
        })
    }

    pub(crate) fn stats(&self) -> UringStats {
        self.stats.get()
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.get()
    }

    fn bump(&self, f: impl FnOnce(&mut UringStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Push one SQE, submitting the queue first when it is full.
    ///
    /// # Safety
    /// Every buffer and pointer in `entry` must stay valid until its completion is reaped.
    unsafe fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: forwarded from the caller's contract.
            let pushed = unsafe { ring.submission().push(entry) };
            if pushed.is_ok() {
                self.unsubmitted.set(self.unsubmitted.get() + 1);
                return Ok(());
            }
            // SQ full: hand what is queued to the kernel, then retry the push.
            match ring.submit() {
                Ok(n) => {
                    self.unsubmitted.set(self.unsubmitted.get().saturating_sub(n as u32));
                    self.bump(|s| s.enter_calls += 1);
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::EINTR)) => {
                    std::hint::spin_loop();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Start an operation if there is room. `Ok(None)` means "full: wait" (the waker is
    /// queued and woken when a slot frees).
    ///
    /// # Safety
    /// As [`Uring::push`].
    unsafe fn start(&self, entry: &squeue::Entry, cx: &mut Context<'_>) -> io::Result<Option<usize>> {
        if self.in_flight.get() >= self.max_in_flight {
            self.space_waiters.borrow_mut().push_back(cx.waker().clone());
            self.bump(|s| s.backpressure_waits += 1);
            return Ok(None);
        }
        let slot = self
            .ops
            .borrow_mut()
            .insert(OpSlot { state: OpState::Pending(Some(cx.waker().clone())), keep: Keep::None });
        let entry = entry.clone().user_data(slot as u64);
        // SAFETY: forwarded from the caller's contract.
        if let Err(e) = unsafe { self.push(&entry) } {
            self.ops.borrow_mut().remove(slot);
            return Err(e);
        }
        self.in_flight.set(self.in_flight.get() + 1);
        self.bump(|s| s.submitted += 1);
        if self.submit_batch > 0 && self.unsubmitted.get() >= self.submit_batch {
            self.flush();
        }
        Ok(Some(slot))
    }

    /// Hand queued SQEs to the kernel (one syscall, only if anything is queued).
    pub(crate) fn flush(&self) -> bool {
        let mut ring = self.ring.borrow_mut();
        if self.unsubmitted.get() == 0 && !ring.submission().taskrun() {
            return false;
        }
        match ring.submit() {
            Ok(n) => {
                self.unsubmitted.set(self.unsubmitted.get().saturating_sub(n as u32));
            }
            Err(e) => log::debug!("io_uring submit deferred: {e}"),
        }
        self.bump(|s| s.enter_calls += 1);
        true
    }

    /// Reap every available completion; returns how many (the wake read excluded).
    pub(crate) fn reap(&self) -> usize {
        let mut n = 0;
        let mut woke_wake_fd = false;
        {
            let mut ring = self.ring.borrow_mut();
            let mut cq = ring.completion();
            cq.sync();
            let mut ops = self.ops.borrow_mut();
            for cqe in &mut cq {
                let tag = cqe.user_data();
                if tag == WAKE_TAG {
                    woke_wake_fd = true;
                    continue;
                }
                n += 1;
                let idx = tag as usize;
                let Some(slot) = ops.get_mut(idx) else {
                    debug_assert!(false, "completion for unknown op slot {idx}");
                    continue;
                };
                match std::mem::replace(&mut slot.state, OpState::Done(cqe.result())) {
                    OpState::Pending(w) => {
                        if let Some(w) = w {
                            w.wake();
                        }
                    }
                    OpState::Orphaned => {
                        ops.remove(idx);
                        self.in_flight.set(self.in_flight.get() - 1);
                    }
                    OpState::Done(_) => debug_assert!(false, "two completions for op slot {idx}"),
                }
            }
        }
        if woke_wake_fd {
            self.wake_armed.set(false);
        }
        if n > 0 {
            self.bump(|s| s.completed += n as u64);
        }
        n
    }

    /// Free the slot of a finished operation and let a waiter in.
    fn finish(&self, slot: usize) {
        self.ops.borrow_mut().remove(slot);
        self.in_flight.set(self.in_flight.get() - 1);
        if let Some(w) = self.space_waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }

    fn poll_slot(&self, slot: usize, cx: &mut Context<'_>) -> Poll<i32> {
        let mut ops = self.ops.borrow_mut();
        let s = &mut ops[slot];
        match &mut s.state {
            OpState::Done(res) => {
                let res = *res;
                drop(ops);
                self.finish(slot);
                Poll::Ready(res)
            }
            OpState::Pending(w) => {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            OpState::Orphaned => unreachable!("polling an orphaned op"),
        }
    }

    fn orphan(&self, slot: usize, keep: Keep) {
        let mut ops = self.ops.borrow_mut();
        let s = &mut ops[slot];
        match s.state {
            OpState::Done(_) => {
                drop(ops);
                self.finish(slot);
                drop(keep);
            }
            _ => {
                s.state = OpState::Orphaned;
                s.keep = keep;
            }
        }
    }

    /// Make sure a read of the wake eventfd is armed (so sleeping in the ring also wakes
    /// on messages from other threads).
    pub(crate) fn arm_wake(&self) {
        if self.wake_armed.get() {
            return;
        }
        let entry =
            opcode::Read::new(types::Fd(self.eventfd), self.wake_buf.get() as *mut u8, 8).build().user_data(WAKE_TAG);
        // SAFETY: `wake_buf` is a heap allocation owned by this Uring, which outlives the
        // ring's use (the ring is dropped first: see Drop for Uring), and nothing else reads
        // or writes it; the eventfd is owned by the reactor and closed after the ring.
        match unsafe { self.push(&entry) } {
            Ok(()) => self.wake_armed.set(true),
            Err(e) => log::warn!("cannot arm reactor wake-up read: {e}"),
        }
    }

    /// Block until at least one completion arrives or `timeout` passes.
    pub(crate) fn wait(&self, timeout: Option<std::time::Duration>) {
        self.arm_wake();
        let ring = self.ring.borrow_mut();
        let res = match timeout {
            Some(t) => {
                let ts = types::Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                ring.submitter().submit_with_args(1, &args)
            }
            None => ring.submitter().submit_and_wait(1),
        };
        self.unsubmitted.set(0);
        self.bump(|s| s.enter_calls += 1);
        if let Err(e) = res {
            if !matches!(
                e.raw_os_error(),
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
            ) {
                log::warn!("io_uring wait failed: {e}");
            }
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if self.in_flight.get() > 0 {
            // The kernel could still write into kept buffers: leak them rather than free
            // memory the kernel may touch (shutdown already waited a bounded time).
            log::error!(
                "reactor ring dropped with {} operations in flight; leaking their buffers",
                self.in_flight.get()
            );
            let ops = std::mem::take(&mut *self.ops.borrow_mut());
            std::mem::forget(ops);
        }
    }
}

// ---- operation futures -----------------------------------------------------------------

fn with_uring<R>(f: impl FnOnce(&Uring) -> R) -> Option<R> {
    super::with_local(|l| f(&l.uring))
}

enum OpPhase {
    Unsubmitted(squeue::Entry),
    InFlight(usize),
    Finished,
}

/// One io_uring operation that keeps no buffer; resolves to the CQE result (`-errno` on
/// failure).
pub struct Op {
    phase: OpPhase,
}

impl Op {
    /// # Safety
    /// Every pointer in `entry` must stay valid until the operation completes — also if this
    /// future is dropped early: then pass the owner of that memory to [`Op::drop_keeping`].
    pub unsafe fn new(entry: squeue::Entry) -> Op {
        Op { phase: OpPhase::Unsubmitted(entry) }
    }

    /// Drop this operation, keeping `keep` alive until the kernel is done with it.
    pub fn drop_keeping(mut self, keep: Keep) {
        if let OpPhase::InFlight(slot) = std::mem::replace(&mut self.phase, OpPhase::Finished) {
            with_uring(|u| u.orphan(slot, keep));
        }
    }

    fn in_flight(&self) -> Option<usize> {
        match self.phase {
            OpPhase::InFlight(s) => Some(s),
            _ => None,
        }
    }
}

impl Future for Op {
    type Output = i32;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let this = &mut *self;
        loop {
            match &this.phase {
                OpPhase::Unsubmitted(entry) => {
                    // SAFETY: the contract of `Op::new` covers this entry's pointers.
                    let started = with_uring(|u| unsafe { u.start(entry, cx) });
                    match started {
                        None => {
                            this.phase = OpPhase::Finished;
                            return Poll::Ready(-libc::ENXIO); // not on a reactor thread
                        }
                        Some(Err(e)) => {
                            this.phase = OpPhase::Finished;
                            return Poll::Ready(-e.raw_os_error().unwrap_or(libc::EIO));
                        }
                        Some(Ok(None)) => return Poll::Pending,
                        Some(Ok(Some(slot))) => this.phase = OpPhase::InFlight(slot),
                    }
                }
                OpPhase::InFlight(slot) => {
                    let slot = *slot;
                    return match with_uring(|u| u.poll_slot(slot, cx)) {
                        Some(Poll::Ready(res)) => {
                            this.phase = OpPhase::Finished;
                            Poll::Ready(res)
                        }
                        Some(Poll::Pending) => Poll::Pending,
                        None => Poll::Ready(-libc::ENXIO),
                    };
                }
                OpPhase::Finished => panic!("io_uring Op polled after completion"),
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let OpPhase::InFlight(slot) = self.phase {
            with_uring(|u| u.orphan(slot, Keep::None));
        }
    }
}

/// What a [`FileIo`] does.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FileOpKind {
    Read,
    /// Write; `fua` makes it durable before completion (RWF_DSYNC).
    Write {
        fua: bool,
    },
    /// fdatasync.
    Flush,
    /// fallocate(mode) over [offset, offset+len).
    Fallocate {
        mode: i32,
    },
}

/// Retries of a transient failure (EAGAIN/EINTR) before it is reported.
const MAX_TRANSIENT_RETRIES: u32 = 1000;

/// A complete positional read/write/flush/fallocate on a file descriptor: short transfers
/// are continued and transient errors retried, so the result is all-or-error. Reading past
/// the end of a regular file yields zeros.
pub struct FileIo {
    fd: RawFd,
    kind: FileOpKind,
    offset: u64,
    len: u64,
    buf: Option<IoBuf>,
    done: u64,
    retries: u32,
    op: Option<Op>,
}

impl FileIo {
    /// # Safety
    /// `fd` must stay open until the operation completes (the bdev that owns it must
    /// outlive its channels' I/O — an fd reused for another file would be written).
    pub unsafe fn new(fd: RawFd, kind: FileOpKind, offset: u64, len: u64, buf: Option<IoBuf>) -> FileIo {
        if matches!(kind, FileOpKind::Read | FileOpKind::Write { .. }) {
            debug_assert!(buf.as_ref().is_some_and(|b| b.len() as u64 == len));
        }
        FileIo { fd, kind, offset, len, buf, done: 0, retries: 0, op: None }
    }

    fn next_entry(&mut self) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        let off = self.offset + self.done;
        let remaining = (self.len - self.done) as u32;
        match self.kind {
            FileOpKind::Read => {
                let buf = self.buf.as_mut().expect("read without buffer");
                // SAFETY: `done < len == buf.len()`, so the pointer stays in the buffer.
                let ptr = unsafe { buf.as_mut_ptr().add(self.done as usize) };
                opcode::Read::new(fd, ptr, remaining).offset(off).build()
            }
            FileOpKind::Write { fua } => {
                let buf = self.buf.as_ref().expect("write without buffer");
                // SAFETY: as for reads.
                let ptr = unsafe { buf.as_ptr().add(self.done as usize) };
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, ptr, remaining).offset(off).rw_flags(flags).build()
            }
            FileOpKind::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            FileOpKind::Fallocate { mode } => {
                opcode::Fallocate::new(fd, self.len).offset(self.offset).mode(mode).build()
            }
        }
    }
}

impl Future for FileIo {
    type Output = (Result<(), Errno>, Option<IoBuf>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            if this.op.is_none() {
                let entry = this.next_entry();
                // SAFETY: the entry points into `this.buf`, which this future owns; if the
                // future is dropped mid-flight, Drop hands the buffer to the slot.
                this.op = Some(unsafe { Op::new(entry) });
            }
            let op = this.op.as_mut().expect("op just set");
            let res = match Pin::new(op).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(res) => res,
            };
            this.op = None;
            if res < 0 {
                let err = Errno::from_neg(res);
                if matches!(err, Errno::EAGAIN | Errno::EINTR) && this.retries < MAX_TRANSIENT_RETRIES {
                    this.retries += 1;
                    continue;
                }
                return Poll::Ready((Err(err), this.buf.take()));
            }
            match this.kind {
                FileOpKind::Read | FileOpKind::Write { .. } => {
                    if res == 0 {
                        if this.kind == FileOpKind::Read {
                            // End of file: the rest reads as zeros.
                            let done = this.done as usize;
                            if let Some(b) = this.buf.as_mut() {
                                b[done..].fill(0);
                            }
                            return Poll::Ready((Ok(()), this.buf.take()));
                        }
                        return Poll::Ready((Err(Errno::EIO), this.buf.take()));
                    }
                    this.done += res as u64;
                    debug_assert!(this.done <= this.len);
                    if this.done >= this.len {
                        return Poll::Ready((Ok(()), this.buf.take()));
                    }
                }
                FileOpKind::Flush | FileOpKind::Fallocate { .. } => return Poll::Ready((Ok(()), this.buf.take())),
            }
        }
    }
}

impl Drop for FileIo {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            if op.in_flight().is_some() {
                let keep = self.buf.take().map(Keep::Buf).unwrap_or(Keep::None);
                op.drop_keeping(keep);
            }
        }
    }
}

/// Socket operations for frontends, with owned buffers.
pub mod net {
    use super::*;

    /// Receive into `buf[at..]` (at most `buf.len() - at` bytes). Resolves to the byte count
    /// (0 = peer closed) or an errno, and gives the buffer back.
    pub fn recv(fd: RawFd, buf: IoBuf, at: usize) -> BufOp {
        BufOp::new(fd, buf, at, true)
    }

    /// Send `buf[at..]`; resolves to the byte count sent (may be short).
    pub fn send(fd: RawFd, buf: IoBuf, at: usize) -> BufOp {
        BufOp::new(fd, buf, at, false)
    }

    /// Accept one connection on a listening socket; resolves to the new fd.
    pub fn accept(fd: RawFd) -> Op {
        let entry = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build();
        // SAFETY: no memory is referenced (null address pointers).
        unsafe { Op::new(entry) }
    }

    /// A recv or send that owns its buffer.
    pub struct BufOp {
        op: Option<Op>,
        buf: Option<IoBuf>,
    }

    impl BufOp {
        fn new(fd: RawFd, mut buf: IoBuf, at: usize, is_recv: bool) -> BufOp {
            assert!(at <= buf.len());
            let len = (buf.len() - at) as u32;
            let entry = if is_recv {
                // SAFETY: `at <= len`, the pointer stays within the buffer.
                let ptr = unsafe { buf.as_mut_ptr().add(at) };
                opcode::Recv::new(types::Fd(fd), ptr, len).build()
            } else {
                // SAFETY: as above.
                let ptr = unsafe { buf.as_ptr().add(at) };
                opcode::Send::new(types::Fd(fd), ptr, len).flags(libc::MSG_NOSIGNAL).build()
            };
            // SAFETY: the entry points into `buf`, owned by this BufOp and handed to the
            // slot by Drop if the operation is still in flight.
            let op = unsafe { Op::new(entry) };
            BufOp { op: Some(op), buf: Some(buf) }
        }
    }

    impl Future for BufOp {
        type Output = (Result<usize, Errno>, IoBuf);
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let op = self.op.as_mut().expect("BufOp polled after completion");
            match Pin::new(op).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(res) => {
                    self.op = None;
                    let buf = self.buf.take().expect("buffer present until completion");
                    let r = if res < 0 { Err(Errno::from_neg(res)) } else { Ok(res as usize) };
                    Poll::Ready((r, buf))
                }
            }
        }
    }

    impl Drop for BufOp {
        fn drop(&mut self) {
            if let Some(op) = self.op.take() {
                let keep = self.buf.take().map(Keep::Buf).unwrap_or(Keep::None);
                op.drop_keeping(keep);
            }
        }
    }
}
