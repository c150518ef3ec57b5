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
//!
//! Multishot receives ([`net::RecvMulti`]) post many CQEs from one SQE into a ring of
//! provided buffers they own; their slot queues the CQEs (bounded by the buffer count) and
//! reserves that many CQ entries, and a dropped one keeps its buffers in the slot until the
//! kernel's last CQE for it.

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
    /// The future is gone; free the slot (and what it keeps) at completion (for a
    /// multishot operation: at its last completion, the one without `IORING_CQE_F_MORE`).
    Orphaned,
    /// A multishot operation: its completions (result, flags) queue here until the owner
    /// takes them; `ended` once the last one (no `F_MORE`) arrived. Bounded: each queued
    /// data completion holds one of the owner's provided buffers, so there are at most
    /// as many as the owner has buffers, plus the last one.
    Multi {
        cqes: VecDeque<(i32, u32)>,
        waker: Option<Waker>,
        ended: bool,
    },
}

struct OpSlot {
    state: OpState,
    keep: Keep,
    /// Completion-queue entries this operation may post before it is reaped (1 for a
    /// single-shot operation), charged to `in_flight` until the slot is freed.
    cost: u32,
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
    /// Kept resources of orphaned operations that completed during a `reap`: dropped after
    /// the ring's borrow ends (a provided-buffer ring unregisters itself on drop).
    graveyard: RefCell<Vec<Keep>>,
    /// Provided-buffer group ids: the next never used one, and released ones.
    next_bgid: Cell<u16>,
    free_bgids: RefCell<Vec<u16>>,
    /// Completion-queue room reserved by live multishot receives (at most half of
    /// `max_in_flight`, so single-shot operations always find room).
    multi_reserved: Cell<u32>,
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
            graveyard: RefCell::new(Vec::new()),
            next_bgid: Cell::new(0),
            free_bgids: RefCell::new(Vec::new()),
            multi_reserved: Cell::new(0),
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
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.start_with(entry, OpState::Pending(Some(cx.waker().clone())), 1, Some(cx)) }
    }

    /// Start an operation in `state` that may post up to `cost` completions; with no
    /// context, a full ring is an error (`EBUSY`) instead of a wait.
    ///
    /// # Safety
    /// As [`Uring::push`].
    unsafe fn start_with(
        &self,
        entry: &squeue::Entry,
        state: OpState,
        cost: u32,
        cx: Option<&mut Context<'_>>,
    ) -> io::Result<Option<usize>> {
        if self.in_flight.get().saturating_add(cost) > self.max_in_flight {
            let Some(cx) = cx else { return Err(io::Error::from_raw_os_error(libc::EBUSY)) };
            self.space_waiters.borrow_mut().push_back(cx.waker().clone());
            self.bump(|s| s.backpressure_waits += 1);
            return Ok(None);
        }
        let slot = self.ops.borrow_mut().insert(OpSlot { state, keep: Keep::None, cost });
        let entry = entry.clone().user_data(slot as u64);
        // SAFETY: forwarded from the caller's contract.
        if let Err(e) = unsafe { self.push(&entry) } {
            self.ops.borrow_mut().remove(slot);
            return Err(e);
        }
        self.in_flight.set(self.in_flight.get() + cost);
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
                let more = io_uring::cqueue::more(cqe.flags());
                match &mut slot.state {
                    OpState::Multi { cqes, waker, ended } => {
                        cqes.push_back((cqe.result(), cqe.flags()));
                        *ended = !more;
                        if let Some(w) = waker.take() {
                            w.wake();
                        }
                    }
                    OpState::Orphaned => {
                        if !more {
                            let dead = ops.remove(idx);
                            self.in_flight.set(self.in_flight.get() - dead.cost);
                            if !matches!(dead.keep, Keep::None) {
                                self.graveyard.borrow_mut().push(dead.keep);
                            }
                        }
                    }
                    OpState::Pending(w) => {
                        if let Some(w) = w.take() {
                            w.wake();
                        }
                        slot.state = OpState::Done(cqe.result());
                    }
                    OpState::Done(_) => debug_assert!(false, "two completions for op slot {idx}"),
                }
            }
        }
        // Outside the ring's borrow: dropping a buffer ring unregisters it.
        let dead = std::mem::take(&mut *self.graveyard.borrow_mut());
        drop(dead);
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
        let s = self.ops.borrow_mut().remove(slot);
        self.in_flight.set(self.in_flight.get() - s.cost);
        for _ in 0..s.cost {
            match self.space_waiters.borrow_mut().pop_front() {
                Some(w) => w.wake(),
                None => break,
            }
        }
        drop(s);
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
            OpState::Orphaned | OpState::Multi { .. } => unreachable!("polling an orphaned or multishot op"),
        }
    }

    fn orphan(&self, slot: usize, keep: Keep) {
        let mut ops = self.ops.borrow_mut();
        let s = &mut ops[slot];
        match s.state {
            OpState::Done(_) | OpState::Multi { ended: true, .. } => {
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

    /// Take the next completion of a multishot operation, or register the waker.
    fn poll_multi(&self, slot: usize, cx: &mut Context<'_>) -> Option<(i32, u32, bool)> {
        let mut ops = self.ops.borrow_mut();
        match &mut ops[slot].state {
            OpState::Multi { cqes, waker, ended } => match cqes.pop_front() {
                Some((res, flags)) => Some((res, flags, *ended && cqes.is_empty())),
                None => {
                    match waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => *waker = Some(cx.waker().clone()),
                    }
                    None
                }
            },
            _ => unreachable!("not a multishot op"),
        }
    }

    /// Start an operation nobody waits for (its slot is freed at completion).
    ///
    /// # Safety
    /// As [`Uring::push`].
    unsafe fn start_detached(&self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.start_with(entry, OpState::Orphaned, 1, None) }.map(drop)
    }

    fn alloc_bgid(&self) -> Option<u16> {
        if let Some(id) = self.free_bgids.borrow_mut().pop() {
            return Some(id);
        }
        let id = self.next_bgid.get();
        if id == u16::MAX {
            return None;
        }
        self.next_bgid.set(id + 1);
        Some(id)
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

    /// Most pieces one [`IoVecs`] sends at once (the rest waits for the next send).
    pub const MAX_IOVECS: usize = 64;

    /// Owned buffers and the pieces of them to send in order with one `sendmsg`: e.g.
    /// reply headers gathered in one buffer, each followed by its read payload in the
    /// payload's own buffer (no copy). Reusable: [`IoVecs::clear`] drops the buffers after
    /// the send, keeps the allocations of the lists.
    pub struct IoVecs {
        bufs: Vec<IoBuf>,
        /// (buffer index, offset, length)
        segs: Vec<(usize, usize, usize)>,
        total: usize,
        iov: Vec<libc::iovec>,
        msg: Box<libc::msghdr>,
    }

    impl Default for IoVecs {
        fn default() -> Self {
            Self::new()
        }
    }

    impl IoVecs {
        pub fn new() -> IoVecs {
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid value (no
            // address, no iovecs, no control data, no flags).
            let msg: libc::msghdr = unsafe { std::mem::zeroed() };
            IoVecs {
                bufs: Vec::new(),
                segs: Vec::new(),
                total: 0,
                iov: Vec::with_capacity(MAX_IOVECS),
                msg: Box::new(msg),
            }
        }

        /// Take ownership of `buf` until the send is done; returns its index for [`IoVecs::push_seg`].
        pub fn push_buf(&mut self, buf: IoBuf) -> usize {
            self.bufs.push(buf);
            self.bufs.len() - 1
        }

        /// Mutable access to a buffer added before (to fill it before sending).
        pub fn buf_mut(&mut self, idx: usize) -> Option<&mut IoBuf> {
            self.bufs.get_mut(idx)
        }

        /// Send `len` bytes of buffer `idx` from `off` next (merged with the previous piece
        /// when it ends where this one starts). False, and nothing added, if the piece is
        /// not inside the buffer or [`MAX_IOVECS`] pieces are queued.
        pub fn push_seg(&mut self, idx: usize, off: usize, len: usize) -> bool {
            let Some(b) = self.bufs.get(idx) else { return false };
            if off.checked_add(len).is_none_or(|end| end > b.len()) {
                return false;
            }
            if len == 0 {
                return true;
            }
            if let Some(last) = self.segs.last_mut() {
                if last.0 == idx && last.1 + last.2 == off {
                    last.2 += len;
                    self.total += len;
                    return true;
                }
            }
            if self.segs.len() >= MAX_IOVECS {
                return false;
            }
            self.segs.push((idx, off, len));
            self.total += len;
            true
        }

        /// Pieces queued.
        pub fn segs(&self) -> usize {
            self.segs.len()
        }

        /// Bytes queued.
        pub fn total(&self) -> usize {
            self.total
        }

        /// Forget the pieces and hand the buffers out (the caller keeps or drops them).
        pub fn clear(&mut self) -> std::vec::Drain<'_, IoBuf> {
            self.segs.clear();
            self.total = 0;
            self.bufs.drain(..)
        }

        /// Point the iovecs and the msghdr at the queued pieces, skipping `skip` bytes.
        fn prepare(&mut self, skip: usize) -> *const libc::msghdr {
            self.iov.clear();
            let mut skip = skip;
            for &(idx, off, len) in &self.segs {
                if skip >= len {
                    skip -= len;
                    continue;
                }
                let b = &self.bufs[idx];
                // SAFETY: push_seg checked `off + len <= b.len()`, and `skip < len`.
                let base = unsafe { b.as_ptr().add(off + skip) };
                self.iov.push(libc::iovec { iov_base: base as *mut libc::c_void, iov_len: len - skip });
                skip = 0;
            }
            self.msg.msg_iov = self.iov.as_mut_ptr();
            self.msg.msg_iovlen = self.iov.len() as _;
            &*self.msg
        }
    }

    /// Send the pieces of `v` after the first `skip` bytes with one `sendmsg`; resolves to
    /// the byte count sent (may be short) and gives `v` back.
    pub fn sendv(fd: RawFd, mut v: IoVecs, skip: usize) -> SendV {
        let msg = v.prepare(skip);
        let entry = opcode::SendMsg::new(types::Fd(fd), msg).flags(libc::MSG_NOSIGNAL as u32).build();
        // SAFETY: the msghdr (boxed), the iovec array (a Vec not touched until completion)
        // and the buffers the iovecs point into are all owned by `v`, which this SendV owns
        // and hands to the slot (Keep::Any) if dropped while the send is in flight; moving
        // `v` does not move any of that heap memory.
        let op = unsafe { Op::new(entry) };
        SendV { op: Some(op), v: Some(v) }
    }

    /// A vectored send that owns its buffers.
    pub struct SendV {
        op: Option<Op>,
        v: Option<IoVecs>,
    }

    impl Future for SendV {
        type Output = (Result<usize, Errno>, IoVecs);
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let op = self.op.as_mut().expect("SendV polled after completion");
            match Pin::new(op).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(res) => {
                    self.op = None;
                    let v = self.v.take().expect("buffers present until completion");
                    let r = if res < 0 { Err(Errno::from_neg(res)) } else { Ok(res as usize) };
                    Poll::Ready((r, v))
                }
            }
        }
    }

    impl Drop for SendV {
        fn drop(&mut self) {
            if let Some(op) = self.op.take() {
                let keep = self.v.take().map_or(Keep::None, |v| Keep::Any(Box::new(v)));
                op.drop_keeping(keep);
            }
        }
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
    /// Provided buffers of a multishot receive: `count` buffers of `size` bytes in one
    /// allocation, and the ring (`count` entries of 16 bytes, page aligned) through which
    /// they are handed to the kernel, registered as buffer group `bgid`.
    struct BufRing {
        bgid: u16,
        /// The ring entries; entry 0's last field doubles as the tail the kernel reads.
        ring: IoBuf,
        bufs: IoBuf,
        count: u16,
        size: u32,
        /// Our copy of the tail (the next entry to fill), published after each refill.
        tail: u16,
        registered: bool,
    }

    impl BufRing {
        fn new(u: &Uring, count: u16, size: u32) -> io::Result<BufRing> {
            if !count.is_power_of_two() || count > 32768 || size == 0 {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let bgid = u.alloc_bgid().ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
            let entry = std::mem::size_of::<types::BufRingEntry>();
            let mut br = BufRing {
                bgid,
                // IoBufs are zeroed at birth and 4096-aligned: the page alignment the kernel
                // wants for a buffer ring.
                ring: IoBuf::zeroed(usize::from(count) * entry),
                bufs: IoBuf::new(usize::from(count) * size as usize),
                count,
                size,
                tail: 0,
                registered: false,
            };
            for bid in 0..count {
                br.push(bid);
            }
            br.publish();
            let ring = u.ring.borrow();
            // SAFETY: `br.ring` is a live, page-aligned allocation of `count` entries that
            // this BufRing owns and does not move (heap memory behind the IoBuf); it is
            // unregistered in Drop before the memory is freed, and Drop of an operation
            // that may still use it is deferred until its last completion (the multishot
            // receive keeps this BufRing in its slot when orphaned).
            let r = unsafe { ring.submitter().register_buf_ring_with_flags(br.ring.as_ptr() as u64, count, bgid, 0) };
            drop(ring);
            match r {
                Ok(()) => {
                    br.registered = true;
                    Ok(br)
                }
                Err(e) => Err(e),
            }
        }

        fn entries(&mut self) -> *mut types::BufRingEntry {
            self.ring.as_mut_ptr().cast()
        }

        /// Write buffer `bid` into the next ring entry (not yet visible to the kernel).
        fn push(&mut self, bid: u16) {
            let idx = usize::from(self.tail & (self.count - 1));
            let addr = self.bufs.as_ptr() as u64 + u64::from(bid) * u64::from(self.size);
            let (size, base) = (self.size, self.entries());
            // SAFETY: `idx < count`, so the entry lies within the ring allocation; the
            // kernel only reads entries between its head and our published tail, and this
            // one is past the tail until `publish`. Only addr/len/bid are written: entry 0's
            // last field is the shared tail. The buffer the entry hands to the kernel
            // (`bid < count`, inside `bufs`) is not read by us until a CQE returns it, and
            // `bufs` stays alive and unmoved (heap memory of an IoBuf we own) until the ring
            // is unregistered: a dropped stream keeps this BufRing in its op slot until the
            // receive's last CQE, and Drop leaks the memory if it cannot unregister.
            let e = unsafe { &mut *base.add(idx) };
            e.set_addr(addr);
            e.set_len(size);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
        }

        /// Make the pushed entries visible to the kernel.
        fn publish(&mut self) {
            let base = self.entries();
            // SAFETY: the tail field of entry 0 lies inside the ring allocation, is 2-byte
            // aligned (offset 14 of a 4096-aligned block), and is only written by us; the
            // kernel reads it with acquire semantics, so a release store orders the entry
            // writes before it.
            let tail = unsafe { &*(types::BufRingEntry::tail(base) as *const std::sync::atomic::AtomicU16) };
            tail.store(self.tail, std::sync::atomic::Ordering::Release);
        }

        fn chunk(&self, bid: u16, len: usize) -> Option<&[u8]> {
            if bid >= self.count || len > self.size as usize {
                return None;
            }
            let at = usize::from(bid) * self.size as usize;
            Some(&self.bufs[at..at + len])
        }
    }

    impl Drop for BufRing {
        fn drop(&mut self) {
            if !self.registered {
                return;
            }
            let bgid = self.bgid;
            let done = with_uring(|u| {
                let ok = u.ring.try_borrow().map(|r| r.submitter().unregister_buf_ring(bgid).is_ok()).unwrap_or(false);
                if ok {
                    u.free_bgids.borrow_mut().push(bgid);
                }
                ok
            });
            if done != Some(true) {
                // Not on the ring's thread (or the ring is gone or busy): the kernel could
                // still read the ring, so leak the memory rather than free it.
                log::warn!("provided buffer ring {bgid} not unregistered; leaking it");
                std::mem::forget(std::mem::replace(&mut self.ring, IoBuf::new(0)));
                std::mem::forget(std::mem::replace(&mut self.bufs, IoBuf::new(0)));
            }
        }
    }

    /// What a multishot receive produced.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RecvEvent {
        /// `len` bytes in provided buffer `bid`: read them with [`RecvMulti::chunk`], then
        /// give the buffer back with [`RecvMulti::recycle`].
        Data { bid: u16, len: usize },
        /// The peer closed its end (or the socket was shut down).
        Eof,
        /// The receive failed; the stream is finished.
        Err(Errno),
        /// [`RecvMulti::pause`] took effect: nothing is receiving on the socket now, and
        /// every byte received before is delivered. The next poll receives again.
        Paused,
    }

    /// A multishot receive (`IORING_OP_RECV` with `IORING_RECV_MULTISHOT`) into a ring of
    /// provided buffers of its own: one SQE, then a completion per arrival of data, with
    /// no SQE and no poll re-arm per receive. Re-armed by itself if the kernel ends it
    /// (e.g. when every buffer was in use). Dropping it cancels the receive; its buffers
    /// stay alive until the kernel's last completion for it.
    pub struct RecvMulti {
        fd: RawFd,
        br: Option<Box<BufRing>>,
        slot: Option<usize>,
        /// The terminal event (EOF or error), repeated on every later poll.
        end: Option<RecvEvent>,
        /// Buffers handed out with `Data` and not recycled yet.
        out: u16,
        pause: bool,
        cancel_sent: bool,
        /// Completion-queue entries reserved for it (`Uring::multi_reserved`).
        reserved: u32,
    }

    impl RecvMulti {
        /// A multishot receive on `fd` with `count` (a power of two, ≤ 32768) buffers of
        /// `size` bytes. Fails off a reactor thread, or if the kernel has no provided buffer
        /// rings (before 5.19); nothing is submitted until the first poll. As with
        /// [`recv`], `fd` should stay open while the stream lives (a reused fd number would
        /// be read from; no memory of ours is at risk either way).
        /// Also fails (`EBUSY`) when the reactor's multishot receives already reserve half
        /// of its completion queue (each reserves `count + 1` entries).
        pub fn new(fd: RawFd, count: u16, size: u32) -> io::Result<RecvMulti> {
            let cost = u32::from(count) + 1;
            let br = with_uring(|u| {
                if u.multi_reserved.get() + cost > u.max_in_flight / 2 {
                    return Err(io::Error::from_raw_os_error(libc::EBUSY));
                }
                let br = BufRing::new(u, count, size)?;
                u.multi_reserved.set(u.multi_reserved.get() + cost);
                Ok(br)
            })
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENXIO))??;
            Ok(RecvMulti {
                fd,
                br: Some(Box::new(br)),
                slot: None,
                end: None,
                out: 0,
                pause: false,
                cancel_sent: false,
                reserved: cost,
            })
        }

        /// Next event. Every `Data` buffer must be recycled before the stream can use it
        /// again; a stream whose buffers are all held re-arms only when polled again.
        pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<RecvEvent> {
            loop {
                if let Some(e) = self.end {
                    return Poll::Ready(e);
                }
                let Some(slot) = self.slot else {
                    if self.pause {
                        self.pause = false;
                        self.cancel_sent = false;
                        return Poll::Ready(RecvEvent::Paused);
                    }
                    let Some(br) = self.br.as_ref() else { return Poll::Ready(RecvEvent::Err(Errno::EIO)) };
                    let entry = opcode::RecvMulti::new(types::Fd(self.fd), br.bgid).build();
                    let state = OpState::Multi { cqes: VecDeque::new(), waker: Some(cx.waker().clone()), ended: false };
                    let cost = u32::from(br.count) + 1;
                    // SAFETY: the entry names no memory but the buffer group, whose ring and
                    // buffers this stream owns; Drop keeps them in the slot until the last
                    // completion if the receive is still active.
                    let started = with_uring(|u| unsafe { u.start_with(&entry, state, cost, Some(cx)) });
                    match started {
                        Some(Ok(Some(s))) => self.slot = Some(s),
                        Some(Ok(None)) => return Poll::Pending,
                        Some(Err(e)) => self.end = Some(RecvEvent::Err(Errno(e.raw_os_error().unwrap_or(libc::EIO)))),
                        None => self.end = Some(RecvEvent::Err(Errno(libc::ENXIO))),
                    }
                    continue;
                };
                let Some(Some((res, flags, last))) = with_uring(|u| u.poll_multi(slot, cx)) else {
                    return Poll::Pending;
                };
                if last {
                    with_uring(|u| u.finish(slot));
                    self.slot = None;
                }
                if res > 0 {
                    let Some(bid) = io_uring::cqueue::buffer_select(flags) else {
                        self.end = Some(RecvEvent::Err(Errno::EIO));
                        continue;
                    };
                    let ok = self.br.as_ref().and_then(|b| b.chunk(bid, res as usize)).is_some();
                    if !ok {
                        self.end = Some(RecvEvent::Err(Errno::EIO));
                        continue;
                    }
                    self.out += 1;
                    return Poll::Ready(RecvEvent::Data { bid, len: res as usize });
                }
                if res == 0 {
                    self.end = Some(RecvEvent::Eof);
                    continue;
                }
                match Errno::from_neg(res) {
                    // Out of buffers, or interrupted: the receive ended, arm it again.
                    e if e == Errno(libc::ENOBUFS) || e == Errno::EINTR || e == Errno::EAGAIN => {}
                    // Our own cancel (pause): the receive ended.
                    e if e == Errno(libc::ECANCELED) && self.pause => {}
                    e => self.end = Some(RecvEvent::Err(e)),
                }
            }
        }

        /// The bytes of a `Data` event (empty if `bid`/`len` do not name one).
        pub fn chunk(&self, bid: u16, len: usize) -> &[u8] {
            self.br.as_ref().and_then(|b| b.chunk(bid, len)).unwrap_or(&[])
        }

        /// Give buffer `bid` back to the kernel.
        pub fn recycle(&mut self, bid: u16) {
            let Some(br) = self.br.as_mut() else { return };
            if bid >= br.count || self.out == 0 {
                return;
            }
            self.out -= 1;
            br.push(bid);
            br.publish();
        }

        /// Stop receiving: the receive is cancelled, and the stream delivers what arrived
        /// before, then `Paused` (after which the caller may read the socket by other
        /// means); polling after `Paused` receives again.
        pub fn pause(&mut self) {
            if self.end.is_some() || self.pause {
                return;
            }
            self.pause = true;
            self.send_cancel();
        }

        fn send_cancel(&mut self) {
            let Some(slot) = self.slot else { return };
            if self.cancel_sent {
                return;
            }
            let entry = opcode::AsyncCancel::new(slot as u64).build();
            // SAFETY: a cancel names no memory.
            let r = with_uring(|u| unsafe { u.start_detached(&entry) });
            if matches!(r, Some(Ok(()))) {
                self.cancel_sent = true;
            } else {
                // No room to cancel: the socket's shutdown by the owner ends it instead.
                log::debug!("multishot receive on fd {}: cancel not submitted", self.fd);
            }
        }
    }

    impl Drop for RecvMulti {
        fn drop(&mut self) {
            let reserved = self.reserved;
            with_uring(|u| u.multi_reserved.set(u.multi_reserved.get().saturating_sub(reserved)));
            if let Some(slot) = self.slot.take() {
                self.send_cancel();
                let keep = self.br.take().map_or(Keep::None, |b| Keep::Any(b));
                if with_uring(|u| u.orphan(slot, keep)).is_none() {
                    log::warn!("multishot receive dropped off its reactor");
                }
            }
        }
    }
}
