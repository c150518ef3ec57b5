//! Single-reactor synchronisation: events and watermarks for tasks of one reactor.
//!
//! These are `!Send` on purpose: tasks never leave their reactor, so waiting needs no
//! atomics. Cross-reactor waiting goes through messages (`ReactorSet::run_on`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A monotonically increasing counter that tasks can wait on.
#[derive(Default)]
pub struct Watermark {
    value: Cell<u64>,
    waiters: RefCell<Vec<(u64, Waker)>>,
}

impl Watermark {
    pub fn new() -> Rc<Watermark> {
        Rc::new(Watermark::default())
    }

    pub fn get(&self) -> u64 {
        self.value.get()
    }

    /// Raise the value (never lowers it) and wake the tasks it satisfies.
    pub fn advance_to(&self, v: u64) {
        if v <= self.value.get() {
            return;
        }
        self.value.set(v);
        let ready: Vec<Waker> = {
            let mut w = self.waiters.borrow_mut();
            let mut ready = Vec::new();
            w.retain(|(target, waker)| {
                if *target <= v {
                    ready.push(waker.clone());
                    false
                } else {
                    true
                }
            });
            ready
        };
        for w in ready {
            w.wake();
        }
    }

    /// Wait until the value is at least `target`.
    pub fn wait_for(self: &Rc<Self>, target: u64) -> WaitFor {
        WaitFor { mark: self.clone(), target }
    }
}

/// Future of [`Watermark::wait_for`].
pub struct WaitFor {
    mark: Rc<Watermark>,
    target: u64,
}

impl Future for WaitFor {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.mark.value.get() >= self.target {
            return Poll::Ready(());
        }
        let mut w = self.mark.waiters.borrow_mut();
        if let Some(e) = w.iter_mut().find(|(t, wk)| *t == self.target && wk.will_wake(cx.waker())) {
            e.1 = cx.waker().clone();
        } else {
            w.push((self.target, cx.waker().clone()));
        }
        Poll::Pending
    }
}

/// A one-shot event: once set, every waiter (present and future) proceeds.
#[derive(Default)]
pub struct Event {
    set: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl Event {
    pub fn new() -> Rc<Event> {
        Rc::new(Event::default())
    }

    pub fn is_set(&self) -> bool {
        self.set.get()
    }

    pub fn set(&self) {
        if self.set.replace(true) {
            return;
        }
        let ws = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in ws {
            w.wake();
        }
    }

    pub fn wait(self: &Rc<Self>) -> EventWait {
        EventWait { ev: self.clone() }
    }
}

/// Future of [`Event::wait`].
pub struct EventWait {
    ev: Rc<Event>,
}

impl Future for EventWait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.ev.set.get() {
            return Poll::Ready(());
        }
        self.ev.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}
