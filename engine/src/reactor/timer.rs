//! Per-reactor timers: a min-heap of deadlines, fired by the poll loop.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

#[derive(Default)]
pub(crate) struct Timers {
    heap: RefCell<BinaryHeap<Reverse<(Instant, usize, u64)>>>,
    entries: RefCell<Slab<(u64, Option<Waker>, bool)>>, // (id, waker, fired)
    next_id: std::cell::Cell<u64>,
}

impl Timers {
    fn add(&self, deadline: Instant, waker: Waker) -> (usize, u64) {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let key = self.entries.borrow_mut().insert((id, Some(waker), false));
        self.heap.borrow_mut().push(Reverse((deadline, key, id)));
        (key, id)
    }

    fn cancel(&self, key: usize, id: u64) {
        let mut e = self.entries.borrow_mut();
        if e.get(key).is_some_and(|x| x.0 == id) {
            e.remove(key);
        }
    }

    fn is_fired(&self, key: usize, id: u64, waker: &Waker) -> bool {
        let mut e = self.entries.borrow_mut();
        match e.get_mut(key) {
            Some(x) if x.0 == id => {
                if x.2 {
                    true
                } else {
                    if !x.1.as_ref().is_some_and(|w| w.will_wake(waker)) {
                        x.1 = Some(waker.clone());
                    }
                    false
                }
            }
            _ => true,
        }
    }

    /// Fire every timer whose deadline passed; returns how many fired.
    pub(crate) fn fire(&self, now: Instant) -> usize {
        let mut n = 0;
        loop {
            let top = {
                let heap = self.heap.borrow();
                matches!(heap.peek(), Some(Reverse((d, _, _))) if *d <= now)
            };
            if !top {
                break;
            }
            let Reverse((_, key, id)) = self.heap.borrow_mut().pop().expect("peeked");
            let w = {
                let mut e = self.entries.borrow_mut();
                match e.get_mut(key) {
                    Some(x) if x.0 == id => {
                        x.2 = true;
                        x.1.take()
                    }
                    _ => None,
                }
            };
            if let Some(w) = w {
                n += 1;
                w.wake();
            }
        }
        n
    }

    /// The earliest pending deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let mut heap = self.heap.borrow_mut();
        let entries = self.entries.borrow();
        // Drop cancelled entries from the top so they do not shorten sleeps.
        while let Some(Reverse((d, key, id))) = heap.peek().copied() {
            if entries.get(key).is_some_and(|x| x.0 == id && !x.2) {
                return Some(d);
            }
            heap.pop();
        }
        None
    }
}

/// Resolves after `deadline` on the current reactor.
pub struct Sleep {
    deadline: Instant,
    registered: Option<(usize, u64)>,
}

impl Sleep {
    pub(crate) fn new(deadline: Instant) -> Sleep {
        Sleep { deadline, registered: None }
    }
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some((k, id)) = self.registered.take() {
                super::with_local(|l| l.timers.cancel(k, id));
            }
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        let registered = self.registered;
        let res = super::with_local(|l| match registered {
            None => Some(l.timers.add(deadline, cx.waker().clone())),
            Some((k, id)) => {
                if l.timers.is_fired(k, id, cx.waker()) {
                    l.timers.cancel(k, id);
                    None
                } else {
                    Some((k, id))
                }
            }
        });
        match res {
            Some(Some(reg)) => {
                self.registered = Some(reg);
                Poll::Pending
            }
            Some(None) => {
                // Fired but the clock says not yet (coarse clocks): re-arm.
                self.registered = None;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None => {
                // Not on a reactor: degrade to a blocking sleep so callers still progress.
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                Poll::Ready(())
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((k, id)) = self.registered.take() {
            super::with_local(|l| l.timers.cancel(k, id));
        }
    }
}

/// Sleep for `d` on the current reactor.
pub fn sleep(d: Duration) -> Sleep {
    Sleep::new(Instant::now() + d)
}
