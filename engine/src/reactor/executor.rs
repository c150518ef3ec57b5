//! The reactor's local task executor.
//!
//! Why a small future executor and not SPDK-style callbacks (see docs/architecture.md): the
//! cache engine's paths are multi-step (look up, read cache, fall back to backing, verify,
//! retry) and read best as `async fn`s; each task still runs on exactly one reactor, never
//! migrates, and needs no `Send`. The hot path stays allocation-free: long-lived tasks (an
//! NBD connection, a perf queue slot) loop over I/Os, and a bdev I/O future is a plain enum,
//! not a boxed future.
//!
//! Tasks live in a slab; a waker encodes (reactor slot, generation, task index) in its data
//! word, so cloning and waking never allocate or touch a refcount. Waking from the owning
//! reactor pushes onto the local ready queue; waking from any other thread pushes onto the
//! owner's bounded remote-wake queue and kicks it out of its idle sleep.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use slab::Slab;

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

struct TaskSlot {
    generation: u32,
    queued: bool,
    future: Option<LocalFuture>,
}

/// Bits of a waker's data word.
const INDEX_BITS: u32 = 32;
const GEN_BITS: u32 = 20;
pub(crate) const REACTOR_SLOT_BITS: u32 = 12;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;
/// Most reactors alive at once in one process (all reactor sets together).
pub(crate) const MAX_REACTOR_SLOTS: usize = 1 << REACTOR_SLOT_BITS;

/// A task id packed into one word: reactor slot | generation | index.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct TaskRef(pub(crate) u64);

impl TaskRef {
    fn new(reactor_slot: usize, generation: u32, index: usize) -> TaskRef {
        debug_assert!(reactor_slot < MAX_REACTOR_SLOTS);
        debug_assert!(index <= u32::MAX as usize);
        TaskRef(
            ((reactor_slot as u64) << (INDEX_BITS + GEN_BITS))
                | (((generation & GEN_MASK) as u64) << INDEX_BITS)
                | index as u64,
        )
    }
    pub(crate) fn reactor_slot(self) -> usize {
        (self.0 >> (INDEX_BITS + GEN_BITS)) as usize
    }
    fn generation(self) -> u32 {
        ((self.0 >> INDEX_BITS) as u32) & GEN_MASK
    }
    fn index(self) -> usize {
        (self.0 & u32::MAX as u64) as usize
    }
}

pub(crate) struct Executor {
    reactor_slot: usize,
    tasks: RefCell<Slab<TaskSlot>>,
    ready: RefCell<VecDeque<TaskRef>>,
    next_generation: Cell<u32>,
    polls: Cell<u64>,
}

impl Executor {
    pub(crate) fn new(reactor_slot: usize) -> Executor {
        Executor {
            reactor_slot,
            tasks: RefCell::new(Slab::with_capacity(1024)),
            ready: RefCell::new(VecDeque::with_capacity(1024)),
            next_generation: Cell::new(1),
            polls: Cell::new(0),
        }
    }

    pub(crate) fn spawn(&self, future: LocalFuture) -> TaskRef {
        let generation = self.next_generation.get();
        self.next_generation.set(generation.wrapping_add(1) & GEN_MASK);
        let index = self.tasks.borrow_mut().insert(TaskSlot { generation, queued: false, future: Some(future) });
        let task = TaskRef::new(self.reactor_slot, generation, index);
        self.wake_local(task);
        task
    }

    /// Queue a task of this executor for polling (deduplicated).
    pub(crate) fn wake_local(&self, task: TaskRef) {
        debug_assert_eq!(task.reactor_slot(), self.reactor_slot);
        let mut tasks = self.tasks.borrow_mut();
        if let Some(slot) = tasks.get_mut(task.index()) {
            if slot.generation & GEN_MASK == task.generation() && !slot.queued {
                slot.queued = true;
                self.ready.borrow_mut().push_back(task);
            }
        }
    }

    /// Poll up to `budget` ready tasks; returns how many were polled.
    pub(crate) fn run_ready(&self, budget: usize) -> usize {
        let mut polled = 0;
        while polled < budget {
            let Some(task) = self.ready.borrow_mut().pop_front() else { break };
            let future = {
                let mut tasks = self.tasks.borrow_mut();
                match tasks.get_mut(task.index()) {
                    Some(slot) if slot.generation & GEN_MASK == task.generation() => {
                        slot.queued = false;
                        slot.future.take()
                    }
                    _ => None,
                }
            };
            let Some(mut future) = future else { continue };
            polled += 1;
            let waker = waker_for(task);
            let mut cx = Context::from_waker(&waker);
            match future.as_mut().poll(&mut cx) {
                Poll::Ready(()) => {
                    self.tasks.borrow_mut().remove(task.index());
                }
                Poll::Pending => {
                    if let Some(slot) = self.tasks.borrow_mut().get_mut(task.index()) {
                        slot.future = Some(future);
                    }
                }
            }
        }
        self.polls.set(self.polls.get() + polled as u64);
        polled
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    pub(crate) fn task_count(&self) -> usize {
        self.tasks.borrow().len()
    }

    /// Drop every task (shutdown). Futures are dropped outside the slab borrow because
    /// their destructors may touch the executor (e.g. drop a JoinHandle).
    pub(crate) fn drop_all(&self) {
        let futures: Vec<LocalFuture> = {
            let mut tasks = self.tasks.borrow_mut();
            let v = tasks.drain().filter_map(|s| s.future).collect();
            self.ready.borrow_mut().clear();
            v
        };
        drop(futures);
    }
}

// ---- wakers ---------------------------------------------------------------------------

fn waker_for(task: TaskRef) -> Waker {
    let raw = RawWaker::new(task.0 as usize as *const (), &VTABLE);
    // SAFETY: the vtable functions below treat the data pointer as a plain integer (the
    // packed TaskRef); they never dereference it, so any value is valid, and clone/drop
    // need no bookkeeping. `usize` is 64 bits on every target we build for (asserted).
    unsafe { Waker::from_raw(raw) }
}

const _: () = assert!(std::mem::size_of::<usize>() == 8, "TaskRef packs 64 bits into a waker");

static VTABLE: RawWakerVTable = RawWakerVTable::new(vt_clone, vt_wake, vt_wake, vt_drop);

fn vt_clone(data: *const ()) -> RawWaker {
    RawWaker::new(data, &VTABLE)
}
fn vt_wake(data: *const ()) {
    super::wake_task(TaskRef(data as usize as u64));
}
fn vt_drop(_: *const ()) {}

// ---- join handles ---------------------------------------------------------------------

pub(crate) struct JoinState<T> {
    pub(crate) result: Option<T>,
    pub(crate) waker: Option<Waker>,
    pub(crate) finished: bool,
}

/// Awaits the output of a task spawned on the current reactor.
pub struct JoinHandle<T> {
    pub(crate) state: Rc<RefCell<JoinState<T>>>,
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut st = self.state.borrow_mut();
        if let Some(v) = st.result.take() {
            return Poll::Ready(v);
        }
        assert!(!st.finished, "JoinHandle polled after completion");
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> JoinHandle<T> {
    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        let st = self.state.borrow();
        st.finished || st.result.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_refs_round_trip() {
        let t = TaskRef::new(4095, 0xABCDE, 123456);
        assert_eq!(t.reactor_slot(), 4095);
        assert_eq!(t.generation(), 0xABCDE);
        assert_eq!(t.index(), 123456);
    }
}
