//! Messages between reactors: closures stored inline in preallocated ring slots.
//!
//! A [`Msg`] is a `FnOnce() + Send` closure that runs on the receiving reactor (SPDK's
//! `spdk_thread_send_msg`). Inboxes are rings of `Msg` values allocated once at start, so a
//! message whose closure fits in [`INLINE_WORDS`] machine words costs no allocation: the
//! ring *is* the message pool, and a full ring is backpressure to the sender. A larger
//! closure is boxed (counted in [`boxed_messages`], so a hot path that does this shows up).

use std::mem::{align_of, size_of, ManuallyDrop, MaybeUninit};
use std::sync::atomic::{AtomicU64, Ordering};

/// Inline capacity of a message, in `usize` words.
pub const INLINE_WORDS: usize = 6;

type Storage = [MaybeUninit<usize>; INLINE_WORDS];

static BOXED: AtomicU64 = AtomicU64::new(0);

/// How many messages so far were too large to store inline.
pub fn boxed_messages() -> u64 {
    BOXED.load(Ordering::Relaxed)
}

/// A closure to run on another reactor.
pub struct Msg {
    storage: Storage,
    /// Runs the closure stored in `storage` and consumes it.
    call: unsafe fn(*mut Storage),
    /// Drops the closure stored in `storage` without running it.
    drop_fn: unsafe fn(*mut Storage),
    live: bool,
}

// SAFETY: a Msg is only ever built from an `F: Send` (see `Msg::new`), and it owns that
// closure exclusively, so sending the Msg sends the closure.
unsafe impl Send for Msg {}

/// # Safety
/// `s` must hold an initialised `F` written by `Msg::new`, which is consumed.
unsafe fn call_inline<F: FnOnce()>(s: *mut Storage) {
    // SAFETY: per the contract, `s` holds an `F`, suitably aligned (checked in `new`).
    let f = unsafe { (s as *mut F).read() };
    f()
}

/// # Safety
/// As `call_inline`.
unsafe fn drop_inline<F>(s: *mut Storage) {
    // SAFETY: per the contract, `s` holds an initialised `F` that nobody else will use.
    unsafe { (s as *mut F).drop_in_place() }
}

impl Msg {
    /// Wrap a closure.
    pub fn new<F: FnOnce() + Send + 'static>(f: F) -> Msg {
        if Self::fits::<F>() {
            Self::inline(f)
        } else {
            BOXED.fetch_add(1, Ordering::Relaxed);
            let boxed: Box<F> = Box::new(f);
            Self::inline(boxed)
        }
    }

    const fn fits<F>() -> bool {
        size_of::<F>() <= size_of::<Storage>() && align_of::<F>() <= align_of::<Storage>()
    }

    fn inline<F: FnOnce() + Send + 'static>(f: F) -> Msg {
        assert!(Self::fits::<F>(), "closure does not fit a message slot");
        let mut storage: Storage = [MaybeUninit::uninit(); INLINE_WORDS];
        let f = ManuallyDrop::new(f);
        // SAFETY: `F` fits in `storage` in both size and alignment (asserted above), and
        // `storage` is valid for writes; ownership of `f` moves into the storage
        // (ManuallyDrop prevents a double drop).
        unsafe { (storage.as_mut_ptr() as *mut F).write(ManuallyDrop::into_inner(f)) };
        Msg { storage, call: call_inline::<F>, drop_fn: drop_inline::<F>, live: true }
    }

    /// Run the closure.
    pub fn run(mut self) {
        debug_assert!(self.live);
        self.live = false;
        // SAFETY: `live` was true, so `storage` holds the closure `call` was made for; we
        // clear `live` first so Drop does not touch the consumed value.
        unsafe { (self.call)(&mut self.storage) }
    }
}

impl Drop for Msg {
    fn drop(&mut self) {
        if self.live {
            self.live = false;
            // SAFETY: `live` means the closure is still stored and was not consumed.
            unsafe { (self.drop_fn)(&mut self.storage) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn small_closures_run_inline_and_large_ones_are_boxed() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let before = boxed_messages();
        Msg::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        })
        .run();
        assert_eq!(boxed_messages(), before, "an Arc capture is inline");
        let big = [7u64; 32];
        let h = hits.clone();
        Msg::new(move || {
            h.fetch_add(big.iter().sum::<u64>() as usize, Ordering::SeqCst);
        })
        .run();
        assert!(boxed_messages() > before);
        assert_eq!(hits.load(Ordering::SeqCst), 1 + 7 * 32);
    }

    #[test]
    fn unrun_messages_drop_their_captures() {
        let token = Arc::new(());
        let t = token.clone();
        let m = Msg::new(move || drop(t));
        assert_eq!(Arc::strong_count(&token), 2);
        drop(m);
        assert_eq!(Arc::strong_count(&token), 1);
    }
}
