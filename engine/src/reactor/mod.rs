//! Pinned polling reactors: one thread per core, each polling its own io_uring, timers,
//! pollers and lock-free inboxes.
//!
//! ```text
//!            ┌──────────── reactor i (pinned to core c_i) ─────────────┐
//!  peers ───▶│ SPSC inbox[j→i] ─┐                                      │
//!  other ───▶│ external MPMC  ──┼─▶ run messages                       │
//!  threads   │ remote wakes ────┘                                      │
//!            │ ready tasks ─────▶ poll futures ──▶ push SQEs           │
//!            │ io_uring: submit once per iteration (if queued), peek CQ│
//!            │ timers, pollers ─▶ busy | idle                          │
//!            │ idle > threshold ─▶ sleep in io_uring_enter (eventfd)   │
//!            └─────────────────────────────────────────────────────────┘
//! ```
//!
//! Rules: a task never leaves its reactor; work crosses reactors only as messages
//! ([`ReactorSet::run_on`], [`send_msg`]); every queue is bounded (inboxes, remote wakes, the
//! ring's in-flight ops), and a full queue is backpressure, never an error or a growth. An
//! idle reactor sleeps in the kernel after `idle_threshold` without work (unless
//! `busy_poll`), so an idle daemon uses ~0% CPU; a reactor that has work never sleeps.

mod executor;
mod msg;
pub mod sync;
pub mod timer;
pub mod uring;

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

pub use executor::JoinHandle;
use executor::{Executor, JoinState, TaskRef, MAX_REACTOR_SLOTS};
pub use msg::{boxed_messages, Msg};
pub use timer::{sleep, Sleep};
pub use uring::{net, FileIo, FileOpKind, Keep, Op, UringStats};

/// How reactors are placed and how they idle.
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// One reactor per entry; `Some(core)` pins it to that CPU.
    pub cores: Vec<Option<usize>>,
    /// Never sleep in the kernel (benchmarks).
    pub busy_poll: bool,
    /// Reactors (by index) that sleep when idle even with `busy_poll`: reactors of
    /// background work only (a cache set's migration reactor), which would otherwise spin
    /// on a core that the threads feeding them need.
    pub idle_sleepers: Vec<usize>,
    /// Idle time after which a reactor sleeps until work arrives.
    pub idle_threshold: Duration,
    /// Submission queue entries of each io_uring.
    pub ring_entries: u32,
    /// Capacity of each inbox (messages from one peer).
    pub inbox_capacity: usize,
    /// Hand SQEs to the kernel as soon as this many are queued (0: once per poll-loop
    /// iteration). Default 1: submitting each I/O at once keeps a deep queue from moving
    /// in lock-step; measured on this project's virtio disk at QD 32, 4K randread:
    /// batch 1 ≈ 138k IOPS, batch 0 ≈ 118k, fio io_uring ≈ 131k (docs/benchmarks.md).
    pub submit_batch: u32,
    /// Set up the rings with `IORING_SETUP_DEFER_TASKRUN` (kernel 6.1+; falls back without
    /// it): completion task work runs only when the reactor enters the kernel to reap, never
    /// on the way out of other syscalls or interrupts. Default off: on this project's VM it
    /// measured no better than COOP_TASKRUN for the NBD server (docs/benchmarks.md, NBD).
    pub defer_taskrun: bool,
    /// Thread name prefix.
    pub name: String,
}

impl ReactorConfig {
    /// `n` unpinned reactors (tests).
    pub fn unpinned(n: usize) -> ReactorConfig {
        ReactorConfig { cores: vec![None; n.max(1)], ..ReactorConfig::default() }
    }

    /// One reactor per listed core, pinned.
    pub fn pinned(cores: &[usize]) -> ReactorConfig {
        ReactorConfig { cores: cores.iter().map(|&c| Some(c)).collect(), ..ReactorConfig::default() }
    }

    /// Parse a core list: "0,1", "0-3", "2,4-5".
    pub fn parse_core_list(s: &str) -> Result<Vec<usize>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let a: usize = a.trim().parse().map_err(|_| format!("bad core number in {part:?}"))?;
                let b: usize = b.trim().parse().map_err(|_| format!("bad core number in {part:?}"))?;
                if a > b || b - a > 4096 {
                    return Err(format!("bad core range {part:?}"));
                }
                out.extend(a..=b);
            } else {
                out.push(part.parse().map_err(|_| format!("bad core number {part:?}"))?);
            }
        }
        if out.is_empty() {
            return Err("empty core list".into());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = out.iter().find(|c| !seen.insert(**c)) {
            return Err(format!("core {dup} listed twice"));
        }
        Ok(out)
    }
}

impl Default for ReactorConfig {
    fn default() -> Self {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        ReactorConfig {
            cores: (0..n).map(Some).collect(),
            busy_poll: false,
            idle_sleepers: Vec::new(),
            idle_threshold: Duration::from_millis(1),
            ring_entries: 512,
            inbox_capacity: 4096,
            submit_batch: 1,
            defer_taskrun: false,
            name: "reactor".into(),
        }
    }
}

/// Busy/idle accounting of one reactor (nanoseconds), readable from any thread.
#[derive(Default)]
struct Counters {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    iterations: AtomicU64,
    sleeps: AtomicU64,
    messages: AtomicU64,
}

/// Snapshot of a reactor's accounting (for `framework_get_reactors`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReactorStats {
    pub index: usize,
    pub lcore: Option<usize>,
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub iterations: u64,
    pub sleeps: u64,
    pub messages: u64,
}

/// The part of a reactor other threads see.
struct Shared {
    index: usize,
    slot: usize,
    core: Option<usize>,
    remote_wakes: ArrayQueue<u64>,
    external: ArrayQueue<Msg>,
    /// Set after a push to `remote_wakes` or `external`, so an idle poll loop checks one
    /// flag instead of two contended queues.
    has_remote: AtomicBool,
    sleeping: AtomicBool,
    eventfd: OwnedFd,
    counters: Counters,
}

impl Shared {
    /// Kick the reactor out of its kernel sleep if it is sleeping.
    fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid local u64 to an eventfd this reactor owns
            // for its whole lifetime (the Arc<Shared> we hold keeps the fd open).
            let r = unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            debug_assert!(r == 8 || r < 0);
        }
    }
}

struct SetInner {
    reactors: Vec<Arc<Shared>>,
    stop: AtomicBool,
    config: ReactorConfig,
}

/// Global table from waker slot to reactor (wakers carry the slot number).
static SLOTS: RwLock<Vec<Option<Arc<Shared>>>> = RwLock::new(Vec::new());

fn alloc_slot(make: impl FnOnce(usize) -> io::Result<Arc<Shared>>) -> io::Result<Arc<Shared>> {
    let mut slots = SLOTS.write().unwrap_or_else(|e| e.into_inner());
    let idx = match slots.iter().position(Option::is_none) {
        Some(i) => i,
        None if slots.len() < MAX_REACTOR_SLOTS => {
            slots.push(None);
            slots.len() - 1
        }
        None => return Err(io::Error::other("too many reactors alive in this process")),
    };
    let shared = make(idx)?;
    slots[idx] = Some(shared.clone());
    Ok(shared)
}

fn free_slot(idx: usize) {
    let mut slots = SLOTS.write().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slots.get_mut(idx) {
        *s = None;
    }
}

/// Wake a task from any thread.
pub(crate) fn wake_task(task: TaskRef) {
    let local = with_local(|l| {
        if l.shared.slot == task.reactor_slot() {
            l.exec.wake_local(task);
            true
        } else {
            false
        }
    });
    if local == Some(true) {
        return;
    }
    let target = {
        let slots = SLOTS.read().unwrap_or_else(|e| e.into_inner());
        slots.get(task.reactor_slot()).cloned().flatten()
    };
    let Some(target) = target else { return }; // reactor gone: nothing left to wake
    let mut spins = 0u32;
    while target.remote_wakes.push(task.0).is_err() {
        // Bounded queue full: the owner drains it every iteration; wait for room.
        target.has_remote.store(true, Ordering::Release);
        target.notify();
        spins += 1;
        if spins > 1_000_000 {
            log::error!("reactor {} remote-wake queue stuck full; dropping a wake", target.index);
            return;
        }
        std::thread::yield_now();
    }
    target.has_remote.store(true, Ordering::Release);
    target.notify();
}

/// Result of one poller run.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PollStatus {
    /// Did work: the reactor must not sleep this iteration.
    Busy,
    /// Nothing to do.
    Idle,
}

/// Something the reactor polls every iteration (SPDK's poller).
pub trait Poller {
    fn name(&self) -> &str;
    fn poll(&mut self) -> PollStatus;
    /// The reactor is about to sleep in the kernel.
    fn on_sleep(&mut self) {}
    /// The reactor woke up.
    fn on_wake(&mut self) {}
}

struct PollerEntry {
    poller: Option<Box<dyn Poller>>,
    runs: u64,
    busy: u64,
}

/// Identifies a registered poller on its reactor.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PollerId(usize);

/// Per-poller counters.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PollerStats {
    pub name: String,
    pub runs: u64,
    pub busy_count: u64,
}

/// The reactor-thread-local part.
pub(crate) struct Local {
    shared: Arc<Shared>,
    set: Arc<SetInner>,
    exec: Executor,
    pub(crate) uring: uring::Uring,
    pub(crate) timers: timer::Timers,
    inboxes: RefCell<Vec<HeapCons<Msg>>>,
    outboxes: RefCell<Vec<HeapProd<Msg>>>,
    pollers: RefCell<slab::Slab<PollerEntry>>,
    storage: RefCell<HashMap<u64, Rc<dyn Any>>>,
    stopping: Cell<bool>,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<Local>>> = const { RefCell::new(None) };
}

pub(crate) fn with_local<R>(f: impl FnOnce(&Local) -> R) -> Option<R> {
    LOCAL.try_with(|l| l.borrow().as_ref().map(|l| f(l))).ok().flatten()
}

/// The index (within its set) of the reactor running this thread, if any.
pub fn current() -> Option<usize> {
    with_local(|l| l.shared.index)
}

/// Number of reactors in the current thread's set (0 off-reactor).
pub fn count() -> usize {
    with_local(|l| l.set.reactors.len()).unwrap_or(0)
}

/// The reactor set of the current thread.
pub fn current_set() -> Option<ReactorSet> {
    with_local(|l| ReactorSet { inner: l.set.clone(), threads: Arc::new(Mutex::new(Vec::new())) })
}

/// Spawn a task on the current reactor. Panics off-reactor.
pub fn spawn<F: Future + 'static>(fut: F) -> JoinHandle<F::Output> {
    let state = Rc::new(RefCell::new(JoinState { result: None, waker: None, finished: false }));
    let st = state.clone();
    let wrapped = async move {
        let v = fut.await;
        let w = {
            let mut s = st.borrow_mut();
            s.result = Some(v);
            s.finished = true;
            s.waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    };
    spawn_detached(wrapped);
    JoinHandle { state }
}

/// Spawn a task whose result nobody awaits. Panics off-reactor.
pub fn spawn_detached<F: Future<Output = ()> + 'static>(fut: F) {
    with_local(|l| {
        l.exec.spawn(Box::pin(fut));
    })
    .expect("spawn called off a reactor thread");
}

/// Yield to other tasks once.
pub fn yield_now() -> impl Future<Output = ()> {
    struct Yield(bool);
    impl Future for Yield {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    Yield(false)
}

/// Register a poller on the current reactor.
pub fn register_poller(p: Box<dyn Poller>) -> Option<PollerId> {
    with_local(|l| PollerId(l.pollers.borrow_mut().insert(PollerEntry { poller: Some(p), runs: 0, busy: 0 })))
}

/// Remove a poller from the current reactor.
pub fn unregister_poller(id: PollerId) -> Option<Box<dyn Poller>> {
    with_local(|l| {
        let mut p = l.pollers.borrow_mut();
        if p.contains(id.0) {
            p.remove(id.0).poller
        } else {
            None
        }
    })
    .flatten()
}

/// Per-reactor storage: the value for `key` on this reactor, created on first use.
/// (Bdev channels live here: one per bdev per reactor.)
pub fn local_storage<T: 'static>(key: u64, init: impl FnOnce() -> Option<T>) -> Option<Rc<T>> {
    with_local(|l| {
        if let Some(v) = l.storage.borrow().get(&key) {
            return v.clone().downcast::<T>().ok();
        }
        let v = Rc::new(init()?);
        l.storage.borrow_mut().insert(key, v.clone() as Rc<dyn Any>);
        Some(v)
    })
    .flatten()
}

/// Remove per-reactor storage for `key` on this reactor.
pub fn remove_local_storage(key: u64) {
    with_local(|l| l.storage.borrow_mut().remove(&key));
}

/// Send a message to reactor `target` of the current set (or of `set` when called off
/// a reactor). Returns the message back when that inbox is full (backpressure).
fn try_send(set: &SetInner, target: usize, msg: Msg) -> Result<(), Msg> {
    let Some(shared) = set.reactors.get(target) else { return Err(msg) };
    let same_set = with_local(|l| std::ptr::eq(Arc::as_ptr(&l.set), set)).unwrap_or(false);
    let res = if same_set {
        with_local(|l| l.outboxes.borrow_mut()[target].try_push(msg)).expect("on a reactor")
    } else {
        let r = shared.external.push(msg);
        shared.has_remote.store(true, Ordering::Release);
        r
    };
    if res.is_ok() {
        shared.notify();
    }
    res
}

/// Send `f` to run on reactor `target` of the current reactor's set, waiting (yielding)
/// while its inbox is full.
pub fn send_msg<F: FnOnce() + Send + 'static>(target: usize, f: F) -> SendMsg {
    let set = with_local(|l| l.set.clone()).expect("send_msg called off a reactor thread");
    SendMsg { set, target, msg: Some(Msg::new(f)) }
}

/// Future of a message send that waits for inbox room.
pub struct SendMsg {
    set: Arc<SetInner>,
    target: usize,
    msg: Option<Msg>,
}

impl Future for SendMsg {
    type Output = Result<(), Msg>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(msg) = self.msg.take() else { return Poll::Ready(Ok(())) };
        if self.target >= self.set.reactors.len() || self.set.stop.load(Ordering::Acquire) {
            return Poll::Ready(Err(msg));
        }
        match try_send(&self.set, self.target, msg) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(m) => {
                self.msg = Some(m);
                if current().is_none() {
                    std::thread::yield_now();
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

/// A running set of reactors.
#[derive(Clone)]
pub struct ReactorSet {
    inner: Arc<SetInner>,
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

/// The target reactor stopped before the work ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canceled;

impl std::fmt::Display for Canceled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reactor stopped before the work completed")
    }
}
impl std::error::Error for Canceled {}

impl ReactorSet {
    /// Start the reactors; returns when every one is polling.
    pub fn start(config: ReactorConfig) -> io::Result<ReactorSet> {
        let n = config.cores.len();
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no reactors configured"));
        }
        let mut shareds = Vec::with_capacity(n);
        for (index, core) in config.cores.iter().enumerate() {
            let shared = alloc_slot(|slot| {
                // SAFETY: plain syscall with constant flags; the result is checked below.
                let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `fd` is a fresh descriptor owned by nobody else.
                let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
                Ok(Arc::new(Shared {
                    index,
                    slot,
                    core: *core,
                    remote_wakes: ArrayQueue::new(65536),
                    external: ArrayQueue::new(config.inbox_capacity.max(16)),
                    has_remote: AtomicBool::new(false),
                    sleeping: AtomicBool::new(false),
                    eventfd,
                    counters: Counters::default(),
                }))
            });
            match shared {
                Ok(s) => shareds.push(s),
                Err(e) => {
                    for s in &shareds {
                        free_slot(s.slot);
                    }
                    return Err(e);
                }
            }
        }
        let inner = Arc::new(SetInner { reactors: shareds, stop: AtomicBool::new(false), config: config.clone() });

        // Inbox matrix: ring (i -> j) has its producer on i and its consumer on j.
        let mut prods: Vec<Vec<Option<HeapProd<Msg>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut conss: Vec<Vec<Option<HeapCons<Msg>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for (i, prod_row) in prods.iter_mut().enumerate() {
            for (j, prod) in prod_row.iter_mut().enumerate() {
                let (p, c) = HeapRb::<Msg>::new(config.inbox_capacity.max(16)).split();
                *prod = Some(p);
                conss[j][i] = Some(c);
            }
        }

        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(n);
        let mut threads = Vec::with_capacity(n);
        for (i, (prod_row, cons_row)) in prods.into_iter().zip(conss).enumerate() {
            let inner2 = inner.clone();
            let ready = ready_tx.clone();
            let outboxes: Vec<HeapProd<Msg>> = prod_row.into_iter().map(|p| p.expect("built")).collect();
            let inboxes: Vec<HeapCons<Msg>> = cons_row.into_iter().map(|c| c.expect("built")).collect();
            let t = std::thread::Builder::new()
                .name(format!("{}{}", config.name, i))
                .spawn(move || reactor_main(inner2, i, inboxes, outboxes, ready))?;
            threads.push(t);
        }
        drop(ready_tx);
        let set = ReactorSet { inner, threads: Arc::new(Mutex::new(threads)) };
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    set.stop();
                    return Err(e);
                }
                Err(_) => {
                    set.stop();
                    return Err(io::Error::other("a reactor thread died during start"));
                }
            }
        }
        Ok(set)
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.inner.reactors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.reactors.is_empty()
    }

    /// The configuration the set was started with.
    pub fn config(&self) -> &ReactorConfig {
        &self.inner.config
    }

    /// Run `f` (which builds a future) on reactor `target` and get its output back. The
    /// returned future may be awaited on any thread or reactor.
    pub fn run_on<F, Fut, T>(&self, target: usize, f: F) -> impl Future<Output = Result<T, Canceled>> + Send + 'static
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = futures::channel::oneshot::channel::<T>();
        let msg = Msg::new(move || {
            spawn_detached(async move {
                let v = f().await;
                let _ = tx.send(v);
            })
        });
        let send = SendMsg { set: self.inner.clone(), target, msg: Some(msg) };
        async move {
            send.await.map_err(|_| Canceled)?;
            rx.await.map_err(|_| Canceled)
        }
    }

    /// Blocking form of [`ReactorSet::run_on`] for threads that are not reactors (main,
    /// RPC, tests). Must not be called on a reactor of this set (it would deadlock).
    pub fn block_on<F, Fut, T>(&self, target: usize, f: F) -> Result<T, Canceled>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        assert!(current().is_none(), "ReactorSet::block_on called on a reactor thread");
        futures::executor::block_on(self.run_on(target, f))
    }

    /// Busy/idle accounting of every reactor.
    pub fn stats(&self) -> Vec<ReactorStats> {
        self.inner
            .reactors
            .iter()
            .map(|s| ReactorStats {
                index: s.index,
                lcore: s.core,
                busy_ns: s.counters.busy_ns.load(Ordering::Relaxed),
                idle_ns: s.counters.idle_ns.load(Ordering::Relaxed),
                iterations: s.counters.iterations.load(Ordering::Relaxed),
                sleeps: s.counters.sleeps.load(Ordering::Relaxed),
                messages: s.counters.messages.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Ask every reactor to stop, wait until each drained its in-flight I/O and exited.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::Release);
        for s in &self.inner.reactors {
            s.notify();
        }
        let threads: Vec<_> = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() == me {
                continue; // stop() called from a reactor: it exits on its own
            }
            let _ = t.join();
        }
    }

    /// Whether `stop` was requested.
    pub fn is_stopping(&self) -> bool {
        self.inner.stop.load(Ordering::Acquire)
    }
}

/// Poller stats of the current reactor.
pub fn poller_stats() -> Vec<PollerStats> {
    with_local(|l| {
        l.pollers
            .borrow()
            .iter()
            .map(|(_, e)| PollerStats {
                name: e.poller.as_ref().map(|p| p.name().to_string()).unwrap_or_default(),
                runs: e.runs,
                busy_count: e.busy,
            })
            .collect()
    })
    .unwrap_or_default()
}

/// io_uring counters of the current reactor.
pub fn uring_stats() -> Option<UringStats> {
    with_local(|l| l.uring.stats())
}

/// Number of live tasks on the current reactor.
pub fn task_count() -> usize {
    with_local(|l| l.exec.task_count()).unwrap_or(0)
}

/// Bound on the time a stopping reactor waits for its in-flight kernel I/O.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages and tasks handled per source per iteration (fairness between sources).
const BATCH: usize = 256;

fn reactor_main(
    set: Arc<SetInner>,
    index: usize,
    inboxes: Vec<HeapCons<Msg>>,
    outboxes: Vec<HeapProd<Msg>>,
    ready: std::sync::mpsc::SyncSender<io::Result<()>>,
) {
    let shared = set.reactors[index].clone();
    if let Some(core) = shared.core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            log::warn!("reactor {index}: could not pin to core {core}; running unpinned");
        }
    }
    let uring = match uring::Uring::new(
        set.config.ring_entries,
        set.config.submit_batch,
        set.config.defer_taskrun,
        shared.eventfd.as_raw_fd(),
    ) {
        Ok(u) => u,
        Err(e) => {
            let _ = ready.send(Err(e));
            free_slot(shared.slot);
            return;
        }
    };
    crate::dma::prealloc(4096, 512);
    crate::dma::prealloc(128 << 10, 16);
    let local = Rc::new(Local {
        shared: shared.clone(),
        set: set.clone(),
        exec: Executor::new(shared.slot),
        uring,
        timers: timer::Timers::default(),
        inboxes: RefCell::new(inboxes),
        outboxes: RefCell::new(outboxes),
        pollers: RefCell::new(slab::Slab::new()),
        storage: RefCell::new(HashMap::new()),
        stopping: Cell::new(false),
    });
    LOCAL.with(|l| *l.borrow_mut() = Some(local.clone()));
    let _ = ready.send(Ok(()));
    drop(ready);

    run_loop(&local);

    // Teardown: tasks first (their drops may orphan ring ops), then wait for the kernel.
    local.exec.drop_all();
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while local.uring.in_flight() > 0 && Instant::now() < deadline {
        local.uring.flush();
        local.uring.reap();
        std::thread::yield_now();
    }
    let pollers = std::mem::take(&mut *local.pollers.borrow_mut());
    drop(pollers);
    let storage = std::mem::take(&mut *local.storage.borrow_mut());
    drop(storage);
    // Messages still queued for us are dropped without running.
    for c in local.inboxes.borrow_mut().iter_mut() {
        while c.try_pop().is_some() {}
    }
    while shared.external.pop().is_some() {}
    LOCAL.with(|l| *l.borrow_mut() = None);
    drop(local);
    free_slot(shared.slot);
}

fn drain_messages(l: &Local) -> usize {
    let mut n = 0;
    let peers = l.inboxes.borrow().len();
    for i in 0..peers {
        for _ in 0..BATCH {
            // Pop outside of the borrow used to run the message: it may send messages.
            let m = l.inboxes.borrow_mut()[i].try_pop();
            match m {
                Some(m) => {
                    m.run();
                    n += 1;
                }
                None => break,
            }
        }
    }
    n
}

/// Messages and wake-ups from threads that are not peers of this reactor (and wakes from
/// any thread): only looked at when a pusher raised `has_remote`.
fn drain_remote(l: &Local) -> usize {
    let shared = &l.shared;
    if !shared.has_remote.load(Ordering::Acquire) {
        return 0;
    }
    // Clear first: a push after this store raises the flag again for the next iteration.
    shared.has_remote.store(false, Ordering::SeqCst);
    let mut n = 0;
    for _ in 0..BATCH {
        match shared.external.pop() {
            Some(m) => {
                m.run();
                n += 1;
            }
            None => break,
        }
    }
    if !shared.external.is_empty() {
        shared.has_remote.store(true, Ordering::Release);
    }
    while let Some(w) = shared.remote_wakes.pop() {
        l.exec.wake_local(TaskRef(w));
        n += 1;
    }
    n
}

fn has_pending_input(l: &Local) -> bool {
    l.exec.has_ready()
        || !l.shared.remote_wakes.is_empty()
        || !l.shared.external.is_empty()
        || l.inboxes.borrow().iter().any(|c| !c.is_empty())
        || l.set.stop.load(Ordering::Acquire)
}

fn run_pollers(l: &Local) -> usize {
    if l.pollers.borrow().is_empty() {
        return 0;
    }
    let mut busy = 0;
    let keys: smallkeys::Keys = smallkeys::Keys::from(l.pollers.borrow().iter().map(|(k, _)| k));
    for k in keys.iter() {
        let p = l.pollers.borrow_mut().get_mut(k).and_then(|e| e.poller.take());
        let Some(mut p) = p else { continue };
        let status = p.poll();
        if let Some(e) = l.pollers.borrow_mut().get_mut(k) {
            e.runs += 1;
            if status == PollStatus::Busy {
                e.busy += 1;
                busy += 1;
            }
            e.poller = Some(p);
        }
    }
    busy
}

fn for_each_poller(l: &Local, f: impl Fn(&mut dyn Poller)) {
    for (_, e) in l.pollers.borrow_mut().iter_mut() {
        if let Some(p) = e.poller.as_mut() {
            f(p.as_mut());
        }
    }
}

fn run_loop(l: &Rc<Local>) {
    let shared = &l.shared;
    let cfg = &l.set.config;
    let busy_poll = cfg.busy_poll && !cfg.idle_sleepers.contains(&shared.index);
    let mut last_work = Instant::now();
    let mut t_prev = last_work;
    loop {
        let mut work = 0usize;
        let msgs = drain_messages(l);
        if msgs > 0 {
            shared.counters.messages.fetch_add(msgs as u64, Ordering::Relaxed);
            work += msgs;
        }
        work += drain_remote(l);
        work += l.exec.run_ready(BATCH);
        if l.uring.flush() {
            work += 1;
        }
        work += l.uring.reap();
        let now = Instant::now();
        work += l.timers.fire(now);
        work += run_pollers(l);

        let elapsed = now.saturating_duration_since(t_prev).as_nanos() as u64;
        t_prev = now;
        if work > 0 {
            shared.counters.busy_ns.fetch_add(elapsed, Ordering::Relaxed);
            last_work = now;
        } else {
            shared.counters.idle_ns.fetch_add(elapsed, Ordering::Relaxed);
        }
        shared.counters.iterations.fetch_add(1, Ordering::Relaxed);

        if l.set.stop.load(Ordering::Acquire) {
            l.stopping.set(true);
            return;
        }
        if work == 0 && !busy_poll && now.duration_since(last_work) >= cfg.idle_threshold {
            shared.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if has_pending_input(l) {
                shared.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            for_each_poller(l, |p| p.on_sleep());
            let timeout = l.timers.next_deadline().map(|d| d.saturating_duration_since(Instant::now()));
            shared.counters.sleeps.fetch_add(1, Ordering::Relaxed);
            l.uring.wait(timeout);
            shared.sleeping.store(false, Ordering::SeqCst);
            for_each_poller(l, |p| p.on_wake());
            let woke = Instant::now();
            shared
                .counters
                .idle_ns
                .fetch_add(woke.saturating_duration_since(t_prev).as_nanos() as u64, Ordering::Relaxed);
            t_prev = woke;
        }
    }
}

/// A small inline list of poller keys (pollers are few; avoids a Vec per iteration).
mod smallkeys {
    pub(super) struct Keys {
        inline: [usize; 16],
        len: usize,
        spill: Vec<usize>,
    }
    impl Keys {
        pub(super) fn from(it: impl Iterator<Item = usize>) -> Keys {
            let mut k = Keys { inline: [0; 16], len: 0, spill: Vec::new() };
            for x in it {
                if k.len < 16 {
                    k.inline[k.len] = x;
                    k.len += 1;
                } else {
                    k.spill.push(x);
                }
            }
            k
        }
        pub(super) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
            self.inline[..self.len].iter().copied().chain(self.spill.iter().copied())
        }
    }
}
