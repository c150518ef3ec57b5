//! Failure handling: error accounting, the cached bdev state machine, a failed cache set,
//! stopped devices and the dead state. The rules and the table of outcomes are in
//! docs/failure-handling.md.
//!
//! ```text
//!  cached bdev (per backing device)
//!
//!   Running ──cache set fails, no dirty data of ours──────────────▶ Degraded
//!      │  └─cache set fails, dirty data of ours──▶ Draining ──all saved──▶ Degraded
//!      │                                              └──data lost / policy "always"──▶ Stopped
//!      ├──backing errors over the limit───────────────────────────────▶ Stopped
//!      ├──backing offline (ENODEV) longer than the grace period────────▶ Stopped
//!      └──detach──▶ Detaching ──no dirty data left──▶ Detached
//!
//!  Degraded, Detached: every I/O goes straight to the backing device, none to the cache.
//!  Stopped (dead): every new I/O fails at once with EIO; accepted I/O completes; the bdev
//!  can still be deleted. Nothing waits for an operator: every wait below has a bound.
//! ```

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::index::{BackingIdx, SegmentId};
use super::ondisk::{record_flags, BlockRecordOnDisk};
use super::set::{Backing, CacheSet};
use crate::dma::IoBuf;
use crate::errno::Errno;

/// State of a cached bdev.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackingState {
    Running = 0,
    /// The cache set failed; this device had nothing dirty (or all of it was saved):
    /// served straight from the backing device.
    Degraded = 1,
    /// The cache set failed and this device's dirty data is being written to it from RAM
    /// and from whatever the cache device still returns. I/O waits (bounded).
    Draining = 2,
    /// Dead: new I/O fails with EIO at once.
    Stopped = 3,
    /// Detach requested: dirty data is being written back; writes bypass the cache.
    Detaching = 4,
    /// Detached: straight to the backing device, zero I/O to the cache.
    Detached = 5,
}

impl BackingState {
    pub fn from_u8(v: u8) -> BackingState {
        match v {
            1 => BackingState::Degraded,
            2 => BackingState::Draining,
            3 => BackingState::Stopped,
            4 => BackingState::Detaching,
            5 => BackingState::Detached,
            _ => BackingState::Running,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackingState::Running => "running",
            BackingState::Degraded => "degraded",
            BackingState::Draining => "draining",
            BackingState::Stopped => "stopped",
            BackingState::Detaching => "detaching",
            BackingState::Detached => "detached",
        }
    }
}

/// An atomic [`BackingState`].
#[derive(Default)]
pub struct StateCell(AtomicU8);

impl StateCell {
    pub fn get(&self) -> BackingState {
        BackingState::from_u8(self.0.load(Ordering::Acquire))
    }
    pub(crate) fn set(&self, s: BackingState) {
        self.0.store(s as u8, Ordering::Release);
    }
    /// Move from `from` to `to`; false if the state was something else.
    pub(crate) fn transition(&self, from: BackingState, to: BackingState) -> bool {
        self.0.compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// What the cache set does to its cached bdevs when the cache device fails
/// (bcache's `stop_when_cache_set_failed`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopPolicy {
    /// Stop only cached bdevs whose dirty data could not be saved.
    Auto,
    /// Stop every cached bdev of the set.
    Always,
}

/// Errors of one device with exponential decay (bcache's io_error_limit and
/// io_error_halflife): each error adds 1, the sum halves every `halflife`.
pub struct ErrorCounter {
    inner: Mutex<(f64, Instant, u64)>,
}

impl Default for ErrorCounter {
    fn default() -> Self {
        ErrorCounter { inner: Mutex::new((0.0, Instant::now(), 0)) }
    }
}

impl ErrorCounter {
    /// Count one error; returns the decayed count including it.
    pub fn record(&self, halflife: Duration) -> f64 {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let decayed = decay(g.0, now.saturating_duration_since(g.1), halflife);
        *g = (decayed + 1.0, now, g.2 + 1);
        g.0
    }

    /// The decayed count now.
    pub fn current(&self, halflife: Duration) -> f64 {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        decay(g.0, g.1.elapsed(), halflife)
    }

    /// Errors ever counted.
    pub fn total(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).2
    }
}

fn decay(v: f64, dt: Duration, halflife: Duration) -> f64 {
    if halflife.is_zero() {
        return v;
    }
    v * 0.5f64.powf(dt.as_secs_f64() / halflife.as_secs_f64())
}

/// Longest an I/O waits for a draining cached bdev to settle.
pub(crate) const DRAIN_WAIT_LIMIT: Duration = Duration::from_secs(60);

impl Backing {
    /// Count a failed backing-device I/O; may stop the cached bdev.
    pub(crate) fn note_error(&self, set: &CacheSet, e: Errno) {
        if e.is_transient() {
            return; // already retried by the channel; never counted as a device error
        }
        let o = set.options();
        if e == Errno::ENODEV || e == Errno::ENXIO {
            let mut off = self.offline_since.lock().unwrap_or_else(|p| p.into_inner());
            if off.is_none() {
                log::warn!("cache set {}: backing device {} went offline ({e})", set.name, self.desc.name());
                *off = Some(Instant::now());
            }
            return;
        }
        let n = self.errors.record(o.io_error_halflife);
        if n >= o.backing_io_error_limit as f64 && self.state.get() != BackingState::Stopped {
            log::error!(
                "cache set {}: stopping {}: too many I/O errors on backing device ({n:.1} ≥ {}, last {e})",
                set.name,
                self.desc.name(),
                o.backing_io_error_limit
            );
            self.stop();
        }
    }

    /// A backing-device I/O succeeded: it is not offline.
    pub(crate) fn note_success(&self) {
        let mut off = self.offline_since.lock().unwrap_or_else(|p| p.into_inner());
        if off.is_some() {
            *off = None;
        }
    }

    /// Enter the dead state.
    pub fn stop(&self) {
        self.state.set(BackingState::Stopped);
    }

    pub fn state(&self) -> BackingState {
        self.state.get()
    }
}

impl CacheSet {
    /// Periodic health check (migration thread): stop backing devices that stayed offline
    /// longer than the grace period.
    pub(crate) fn check_offline_backings(&self) {
        let grace = self.options().backing_offline_grace;
        for b in self.backings() {
            let since = *b.offline_since.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = since {
                if t.elapsed() >= grace && b.state() != BackingState::Stopped {
                    log::error!(
                        "cache set {}: backing device {} offline for {:?}; stopping its cached bdev",
                        self.name,
                        b.desc.name(),
                        t.elapsed()
                    );
                    b.stop();
                }
            }
        }
    }

    /// Count a cache-device error. Reads of clean data are recoverable (served from the
    /// backing device); too many errors, or any failed log write, fail the cache set.
    pub(crate) fn note_cache_error(self: &Arc<Self>, e: Errno, what: &str) {
        if e.is_transient() {
            return;
        }
        let o = self.options();
        let n = self.cache_errors.record(o.io_error_halflife);
        if n >= o.cache_io_error_limit as f64 {
            self.fail(what, e);
        }
    }

    /// The cache device is unusable: no more log writes; each cached bdev degrades to its
    /// backing device or stops, per [`StopPolicy`], after its dirty data has been saved
    /// where possible. Runs the rescue on a thread of its own (it waits on I/O).
    pub(crate) fn fail(self: &Arc<Self>, why: &str, e: Errno) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        log::error!("cache set {}: cache device failed ({why}: {e}); caching disabled", self.name);
        for b in self.backings() {
            if !b.state.transition(BackingState::Running, BackingState::Draining) {
                b.state.transition(BackingState::Detaching, BackingState::Draining);
            }
        }
        let set = self.clone();
        let spawned = std::thread::Builder::new().name(format!("rescue-{}", self.name)).spawn(move || rescue(set));
        if let Err(err) = spawned {
            log::error!("cache set {}: cannot start the rescue thread ({err}); stopping its cached bdevs", self.name);
            for b in self.backings() {
                b.stop();
            }
        }
    }
}

/// Save what can be saved after a cache failure, then settle every cached bdev.
fn rescue(set: Arc<CacheSet>) {
    let started = Instant::now();
    let mut lost: Vec<BackingIdx> = Vec::new();
    // 1. RAM: every reactor's open segment (acknowledged writes not yet on the cache
    //    device) goes straight to the backing devices.
    for r in 0..set.reactors.len() {
        let s = set.clone();
        match set.reactors.block_on(r, move || async move {
            match s.existing_local() {
                Some(l) => l.rescue_open_segment().await,
                None => Vec::new(),
            }
        }) {
            Ok(l) => lost.extend(l),
            Err(_) => lost.extend(set.backings().iter().map(|b| b.idx)),
        }
    }
    // 2. The log: live dirty blocks of every sealed segment, oldest first, read back from
    //    the cache device (it may still serve reads) and written to their devices.
    //    Segments whose write failed are not on the device: their writer task rescued them
    //    from RAM (and recorded any loss), so only written ones are read back here.
    let segs: Vec<SegmentId> =
        set.sealed.lock().unwrap_or_else(|e| e.into_inner()).values().filter(|s| s.written).map(|s| s.seg).collect();
    for seg in segs {
        let mut part = set.index.register();
        let dirty = set.index.dirty_slots(&part, seg).unwrap_or_default();
        part.offline();
        drop(part);
        if dirty.is_empty() {
            continue;
        }
        let s = set.clone();
        let d = dirty.clone();
        let res = set
            .reactors
            .block_on(set.migration_reactor(), move || async move {
                super::writeback::write_back_blocks(&s, &d, false).await
            })
            .unwrap_or(Err(Errno::ESHUTDOWN));
        if let Err(e) = res {
            log::error!("cache set {}: rescue of segment {} failed ({e}); its dirty data is lost", set.name, seg.0);
            lost.extend(dirty.iter().map(|d| d.key.backing()));
        }
    }
    // 3. Flush every backing device that is still reachable.
    for b in set.backings() {
        let d = b.desc.clone();
        let r =
            set.reactors.block_on(set.migration_reactor(), move || async move { d.channel()?.flush().await.status });
        if !matches!(r, Ok(Ok(()))) {
            lost.push(b.idx);
        }
    }
    // 4. Settle.
    let policy = set.options().stop_when_cache_set_failed;
    for b in set.backings() {
        let data_lost = lost.contains(&b.idx);
        let stop = data_lost || policy == StopPolicy::Always;
        let to = if stop { BackingState::Stopped } else { BackingState::Degraded };
        if b.state.transition(BackingState::Draining, to) {
            if data_lost {
                log::error!(
                    "cache set {}: {} stopped: dirty data on the failed cache could not be saved",
                    set.name,
                    b.desc.name()
                );
            } else if stop {
                log::warn!("cache set {}: {} stopped (stop_when_cache_set_failed=always)", set.name, b.desc.name());
            } else {
                log::warn!("cache set {}: {} now served from its backing device only", set.name, b.desc.name());
            }
        }
    }
    set.stop_migration();
    log::info!("cache set {}: failure handling finished in {:?}", set.name, started.elapsed());
}

impl super::log::ReactorLog {
    /// Write the DIRTY records of a segment buffer straight to their backing devices.
    /// Returns the backing devices for which that failed.
    pub(crate) async fn rescue_buffer(
        &self,
        seg: SegmentId,
        records: &[BlockRecordOnDisk],
        buf: &IoBuf,
    ) -> Vec<BackingIdx> {
        let set = &self.set;
        let bs = set.block_size() as usize;
        let hdr = set.geom.header_bytes();
        let mut lost = Vec::new();
        for (i, r) in records.iter().enumerate() {
            if r.flags & record_flags::DIRTY == 0 {
                continue;
            }
            let Some(b) = set.backing(r.backing()) else { continue };
            // Only the newest version of a block goes out: an older one could land on top
            // of a newer one rescued from another buffer.
            let Some(key) = super::index::BlockKey::new(r.backing(), r.lba()) else { continue };
            if self.lookup(key).is_none_or(|h| h.slot != set.geom.slot_id(seg, i as u32)) {
                continue;
            }
            let off = b.data_offset + r.lba().0 * bs as u64;
            let res = match b.desc.channel() {
                Ok(ch) if r.flags & record_flags::ZERO != 0 => ch.write_zeroes(off, bs as u64).await.status,
                Ok(ch) => {
                    let data = IoBuf::from_slice(&buf[hdr + i * bs..hdr + (i + 1) * bs]);
                    ch.write(off, data, false).await.status
                }
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                log::error!("cache set {}: rescuing block {} of {} failed: {e}", set.name, r.lba().0, b.desc.name());
                if !lost.contains(&b.idx) {
                    lost.push(b.idx);
                }
            }
        }
        lost
    }
}

/// Progress of a detach (or of a flush): what is left and how fast it goes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DrainStatus {
    pub state: &'static str,
    pub dirty_blocks: u64,
    pub done: bool,
}

impl CacheSet {
    /// Live dirty blocks of one backing device (a scan of the index: for status calls).
    pub fn dirty_blocks_of(&self, idx: BackingIdx) -> u64 {
        let mut part = self.index.register();
        let mut n = 0u64;
        for s in 0..self.nr_segments() {
            if let Ok(d) = self.index.dirty_slots(&part, SegmentId(s)) {
                n += d.iter().filter(|d| d.key.backing() == idx).count() as u64;
            }
        }
        part.offline();
        n
    }

    /// Detach a backing device: writes bypass the cache from now on, its dirty data is
    /// written back in the background, then it is served straight from the backing
    /// device with zero I/O to the cache. Returns at once; follow with
    /// [`CacheSet::detach_status`].
    pub fn detach(self: &Arc<Self>, b: &Arc<Backing>) -> Result<(), Errno> {
        match b.state() {
            BackingState::Detaching | BackingState::Detached => return Ok(()),
            BackingState::Running => {}
            BackingState::Degraded => {
                // Already served without the cache; nothing is dirty.
                b.state.set(BackingState::Detached);
                return Ok(());
            }
            BackingState::Draining | BackingState::Stopped => return Err(Errno::EBUSY),
        }
        if !b.state.transition(BackingState::Running, BackingState::Detaching) {
            return Err(Errno::EBUSY);
        }
        self.request_drain();
        let set = self.clone();
        let b = b.clone();
        std::thread::Builder::new()
            .name(format!("detach-{}", b.desc.name()))
            .spawn(move || {
                while b.state() == BackingState::Detaching {
                    if set.dirty_blocks_of(b.idx) == 0 {
                        // Seal everywhere once more so nothing of ours stays in a RAM buffer.
                        set.request_drain();
                        if set.dirty_blocks_of(b.idx) == 0
                            && b.state.transition(BackingState::Detaching, BackingState::Detached)
                        {
                            log::info!("cache set {}: {} detached", set.name, b.desc.name());
                            break;
                        }
                    }
                    set.request_drain();
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .map_err(|_| Errno::ENOMEM)?;
        Ok(())
    }

    /// Where a detach (or flush) of `b` stands.
    pub fn detach_status(&self, b: &Backing) -> DrainStatus {
        let st = b.state();
        let dirty = if st == BackingState::Detached { 0 } else { self.dirty_blocks_of(b.idx) };
        DrainStatus { state: st.name(), dirty_blocks: dirty, done: st == BackingState::Detached }
    }
}
