//! The bdev table of one target (daemon instance), and open descriptors.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Bdev, IoChannel};
use crate::errno::Errno;
use crate::reactor;

static NEXT_BDEV_ID: AtomicU64 = AtomicU64::new(1);

/// Per-reactor storage keys of bdev channels live in the upper half of the key space.
const CHANNEL_KEY_BASE: u64 = 1 << 63;

struct Entry {
    bdev: Arc<dyn Bdev>,
    id: u64,
    claimed_by: Option<String>,
    order: u64,
}

/// Bdevs by name, in creation order. Claims mark a bdev as the base of another one (it
/// cannot be deleted or claimed twice until released).
#[derive(Default)]
pub struct BdevRegistry {
    inner: Mutex<HashMap<String, Entry>>,
    order: AtomicU64,
}

impl BdevRegistry {
    pub fn new() -> BdevRegistry {
        BdevRegistry::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a bdev; EEXIST if the name is taken.
    pub fn register(&self, bdev: Arc<dyn Bdev>) -> Result<BdevDesc, Errno> {
        let name = bdev.info().name.clone();
        if name.is_empty() {
            return Err(Errno::EINVAL);
        }
        let mut m = self.lock();
        if m.contains_key(&name) {
            return Err(Errno::EEXIST);
        }
        let id = NEXT_BDEV_ID.fetch_add(1, Ordering::Relaxed);
        let order = self.order.fetch_add(1, Ordering::Relaxed);
        m.insert(name, Entry { bdev: bdev.clone(), id, claimed_by: None, order });
        Ok(BdevDesc { bdev, id })
    }

    /// Remove a bdev (ENODEV if unknown, EBUSY if another bdev claims it). The caller
    /// closes its channels on every reactor ([`BdevDesc::close_channels`]).
    pub fn unregister(&self, name: &str) -> Result<BdevDesc, Errno> {
        let mut m = self.lock();
        match m.get(name) {
            None => Err(Errno::ENODEV),
            Some(e) if e.claimed_by.is_some() => Err(Errno::EBUSY),
            Some(_) => {
                let e = m.remove(name).expect("checked");
                drop(m);
                e.bdev.shutdown();
                Ok(BdevDesc { bdev: e.bdev, id: e.id })
            }
        }
    }

    /// Open a bdev by name.
    pub fn open(&self, name: &str) -> Result<BdevDesc, Errno> {
        let m = self.lock();
        let e = m.get(name).ok_or(Errno::ENODEV)?;
        Ok(BdevDesc { bdev: e.bdev.clone(), id: e.id })
    }

    /// Claim `name` as the base of `by` (exclusive).
    pub fn claim(&self, name: &str, by: &str) -> Result<BdevDesc, Errno> {
        let mut m = self.lock();
        let e = m.get_mut(name).ok_or(Errno::ENODEV)?;
        if e.claimed_by.is_some() {
            return Err(Errno::EBUSY);
        }
        e.claimed_by = Some(by.to_string());
        Ok(BdevDesc { bdev: e.bdev.clone(), id: e.id })
    }

    /// Release a claim made by `by`.
    pub fn release(&self, name: &str, by: &str) {
        let mut m = self.lock();
        if let Some(e) = m.get_mut(name) {
            if e.claimed_by.as_deref() == Some(by) {
                e.claimed_by = None;
            }
        }
    }

    /// Who claims `name`, if anyone.
    pub fn claimed_by(&self, name: &str) -> Option<String> {
        self.lock().get(name).and_then(|e| e.claimed_by.clone())
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Bdev>> {
        self.lock().get(name).map(|e| e.bdev.clone())
    }

    /// Every bdev, in creation order.
    pub fn list(&self) -> Vec<Arc<dyn Bdev>> {
        let m = self.lock();
        let mut v: Vec<_> = m.values().map(|e| (e.order, e.bdev.clone())).collect();
        v.sort_by_key(|(o, _)| *o);
        v.into_iter().map(|(_, b)| b).collect()
    }
}

/// An open handle to a bdev.
#[derive(Clone)]
pub struct BdevDesc {
    bdev: Arc<dyn Bdev>,
    id: u64,
}

impl BdevDesc {
    /// A descriptor for a bdev that is not in any registry (stacked internals, tests).
    pub fn new(bdev: Arc<dyn Bdev>) -> BdevDesc {
        BdevDesc { bdev, id: NEXT_BDEV_ID.fetch_add(1, Ordering::Relaxed) }
    }

    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    pub fn name(&self) -> &str {
        &self.bdev.info().name
    }

    /// The calling reactor's channel to this bdev (created on first use). ENXIO off a
    /// reactor.
    pub fn channel(&self) -> Result<Rc<IoChannel>, Errno> {
        if reactor::current().is_none() {
            return Err(Errno::ENXIO);
        }
        let mut err = None;
        let ch = reactor::local_storage(CHANNEL_KEY_BASE | self.id, || match IoChannel::new(self.bdev.clone()) {
            Ok(c) => Some(Rc::new(c)),
            Err(e) => {
                err = Some(e);
                None
            }
        });
        match (ch, err) {
            (Some(c), _) => Ok((*c).clone()),
            (None, Some(e)) => Err(e),
            (None, None) => Err(Errno::ENXIO),
        }
    }

    /// The calling reactor's channel, if it was ever created.
    pub fn existing_channel(&self) -> Option<Rc<IoChannel>> {
        reactor::local_storage::<Rc<IoChannel>>(CHANNEL_KEY_BASE | self.id, || None).map(|c| (*c).clone())
    }

    /// Drop this descriptor's channel on the calling reactor.
    pub fn close_channel(&self) {
        reactor::remove_local_storage(CHANNEL_KEY_BASE | self.id);
    }

    /// Drop this descriptor's channels on every reactor of `set`.
    pub async fn close_channels(&self, set: &reactor::ReactorSet) {
        for r in 0..set.len() {
            let d = self.clone();
            let _ = set.run_on(r, move || async move { d.close_channel() }).await;
        }
    }

    /// Sum of this descriptor's channel statistics over every reactor of `set`.
    pub async fn iostat(&self, set: &reactor::ReactorSet) -> super::IoStats {
        let mut total = super::IoStats::default();
        for r in 0..set.len() {
            let d = self.clone();
            if let Ok(Some(s)) = set.run_on(r, move || async move { d.existing_channel().map(|c| c.stats()) }).await {
                total.add(&s);
            }
        }
        total
    }
}
