//! Failure handling, scenario by scenario (../shared/seeds): each test drives a fault into
//! a simulated device and checks what clients see and what data survives, against a model.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tiercache_engine::bdev::BdevDesc;
use tiercache_engine::cache::{self, BackingState, CacheMode, CacheOptions, CacheSet, CachedBdev, StopPolicy};
use tiercache_engine::reactor::{ReactorConfig, ReactorSet};
use tiercache_engine::sim::SimDisk;
use tiercache_engine::{Errno, IoBuf};

const DATA_OFFSET: usize = 1 << 20;

mod common;
use common::{block, BS};

struct Rig {
    rs: ReactorSet,
    cache: Arc<SimDisk>,
    backings: Vec<Arc<SimDisk>>,
    set: Arc<CacheSet>,
    vols: Vec<(Arc<CachedBdev>, BdevDesc)>,
}

fn rig(n_backing: usize, mode: CacheMode, opts: CacheOptions) -> Rig {
    let rs = ReactorSet::start(ReactorConfig::unpinned(2)).unwrap();
    let cache = SimDisk::new("cache", 512, 8 << 11);
    let backings: Vec<_> = (0..n_backing).map(|i| SimDisk::new(&format!("b{i}"), 512, 8 << 11)).collect();
    let (c, bs, rs2) = (cache.clone(), backings.clone(), rs.clone());
    let (set, vols) = rs
        .block_on(0, move || async move {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let name = format!("s{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            let set = cache::format(&name, BdevDesc::new(c), rs2, opts).await.unwrap();
            let mut vols = Vec::new();
            for (i, b) in bs.into_iter().enumerate() {
                let back = set.attach(BdevDesc::new(b), mode).await.unwrap();
                let cb = CachedBdev::new(&format!("vol{i}"), set.clone(), back);
                vols.push(cb);
            }
            (set, vols)
        })
        .unwrap();
    let vols = vols.into_iter().map(|cb| (cb.clone(), BdevDesc::new(cb))).collect();
    Rig { rs, cache, backings, set, vols }
}

impl Rig {
    fn write(&self, vol: usize, r: usize, lba: u64, v: u64) -> Result<(), Errno> {
        let d = self.vols[vol].1.clone();
        self.rs
            .block_on(r, move || async move {
                d.channel()?.write(lba * BS as u64, IoBuf::from_slice(&block(lba, v)), false).await.status
            })
            .unwrap()
    }
    fn read(&self, vol: usize, r: usize, lba: u64) -> Result<Vec<u8>, Errno> {
        let d = self.vols[vol].1.clone();
        self.rs
            .block_on(r, move || async move {
                let c = d.channel()?.read(lba * BS as u64, IoBuf::new(BS)).await;
                c.status.map(|_| c.buf.unwrap().to_vec())
            })
            .unwrap()
    }
    fn flush(&self, vol: usize) -> Result<(), Errno> {
        let d = self.vols[vol].1.clone();
        self.rs.block_on(0, move || async move { d.channel()?.flush().await.status }).unwrap()
    }
    fn state(&self, vol: usize) -> BackingState {
        self.vols[vol].0.backing().state()
    }
    fn wait_state(&self, vol: usize, want: BackingState, limit: Duration) {
        let t = Instant::now();
        while self.state(vol) != want {
            assert!(t.elapsed() < limit, "volume {vol} stuck in {:?}, wanted {want:?}", self.state(vol));
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    fn backing_block(&self, vol: usize, lba: u64) -> Vec<u8> {
        let img = self.backings[vol].current_image();
        img[DATA_OFFSET + lba as usize * BS..DATA_OFFSET + (lba as usize + 1) * BS].to_vec()
    }
    fn shutdown(self) {
        self.set.stop_migration();
        drop(self.vols);
        self.rs.stop();
    }
}

fn opts() -> CacheOptions {
    CacheOptions { segment_size: 128 << 10, ..CacheOptions::default() }
}

/// Seed 000 test 1, done better: the cache device fails under random writes; caching is
/// disabled, the device stays alive, and no client write fails or is lost — also in
/// writeback mode, where the rescue writes acknowledged data from RAM to the backing device.
///
/// Variants: writethrough (nothing is ever dirty); writeback after a flush of all dirty data
/// (clean cache; acknowledged writes in RAM buffers at the moment of failure are rescued);
/// writeback with dirty data on a cache device that fails only for writes (the rescue reads
/// the dirty data back and writes it to the backing device).
#[test]
fn cache_failure_under_writes_loses_nothing_and_degrades() {
    for (mode, drain_first, reads_fail) in [
        (CacheMode::WriteThrough, false, true),
        (CacheMode::WriteBack, true, true),
        (CacheMode::WriteBack, false, false),
    ] {
        let r = rig(1, mode, opts());
        let mut errors = 0;
        for lba in 0..64 {
            if r.write(0, (lba % 2) as usize, lba, 1).is_err() {
                errors += 1;
            }
        }
        if drain_first {
            r.set.request_drain();
            let t = Instant::now();
            while r.set.dirty_blocks() > 0 {
                assert!(t.elapsed() < Duration::from_secs(10), "drain stuck");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if reads_fail {
            r.cache.set_fail_all(Some(Errno::EIO));
        } else {
            r.cache.set_fail_writes(Some(Errno::EIO));
        }
        for lba in 0..128 {
            if r.write(0, (lba % 2) as usize, lba, 2).is_err() {
                errors += 1;
            }
        }
        r.wait_state(0, BackingState::Degraded, Duration::from_secs(10));
        for lba in 128..160 {
            if r.write(0, 0, lba, 3).is_err() {
                errors += 1;
            }
        }
        assert_eq!(errors, 0, "{mode:?}: client-visible write errors");
        r.flush(0).unwrap();
        for lba in 0..160u64 {
            let want = block(lba, if lba < 128 { 2 } else { 3 });
            assert_eq!(r.read(0, 1, lba).unwrap(), want, "{mode:?}: lba {lba} read");
            assert_eq!(r.backing_block(0, lba), want, "{mode:?}: lba {lba} on the backing device");
        }
        r.shutdown();
    }
}

/// Seed 000 test 2: dirty data on a cache device that fails for reads and writes cannot be
/// saved; the cached bdev is stopped — its reads fail, they never return older data from
/// the backing device.
#[test]
fn dirty_cache_that_fails_stops_the_device_and_never_serves_stale_data() {
    let r = rig(1, CacheMode::WriteBack, CacheOptions { seal_idle: Duration::from_millis(1), ..opts() });
    for lba in 0..40 {
        r.write(0, 0, lba, 5).unwrap();
    }
    r.flush(0).unwrap(); // on the cache device, not yet written back
    r.cache.set_fail_all(Some(Errno::EIO));
    let _ = r.write(0, 0, 100, 6); // triggers the failure through a segment write
    let _ = r.flush(0);
    r.wait_state(0, BackingState::Stopped, Duration::from_secs(10));
    for lba in 0..40 {
        assert_eq!(r.read(0, 1, lba), Err(Errno::EIO), "lba {lba}: a stopped device answers EIO");
    }
    r.shutdown();
}

/// Seed 000 test 3: after detach, writes go only to the backing device (zero I/O to the
/// cache device), and the data written before the detach was written back.
#[test]
fn detach_drains_then_bypasses_the_cache_completely() {
    let r = rig(1, CacheMode::WriteBack, opts());
    for lba in 0..50 {
        r.write(0, (lba % 2) as usize, lba, 7).unwrap();
    }
    r.set.detach(r.vols[0].0.backing()).unwrap();
    r.wait_state(0, BackingState::Detached, Duration::from_secs(20));
    assert_eq!(r.set.detach_status(r.vols[0].0.backing()).dirty_blocks, 0);
    let before = r.cache.counts();
    for lba in 0..200 {
        r.write(0, (lba % 2) as usize, lba, 8).unwrap();
        assert_eq!(r.read(0, 0, lba).unwrap(), block(lba, 8));
    }
    r.flush(0).unwrap();
    // Only the migration thread's own bookkeeping may have touched it before it idled.
    let after = r.cache.counts();
    assert_eq!(after, before, "the cache device saw I/O after detach");
    for lba in 0..200 {
        assert_eq!(r.backing_block(0, lba), block(lba, 8));
    }
    r.shutdown();
}

/// Seed 000 tests 4 and 6: errors on one backing device stop its cached bdev after the
/// limit; the other cached bdev on the same cache set keeps working.
#[test]
fn backing_errors_stop_only_that_device() {
    let r = rig(2, CacheMode::WriteThrough, CacheOptions { backing_io_error_limit: 8, ..opts() });
    for lba in 0..20 {
        r.write(0, 0, lba, 1).unwrap();
        r.write(1, 1, lba, 1).unwrap();
    }
    r.backings[0].set_fail_all(Some(Errno::EIO));
    let mut failed = 0;
    for lba in 0..40 {
        if r.write(0, 0, lba, 2).is_err() {
            failed += 1;
        }
    }
    assert!(failed > 0);
    assert_eq!(r.state(0), BackingState::Stopped);
    // Dead: fails at once.
    let t = Instant::now();
    assert_eq!(r.read(0, 0, 1), Err(Errno::EIO));
    assert!(t.elapsed() < Duration::from_millis(200));
    // The neighbour is untouched.
    for lba in 0..40 {
        r.write(1, (lba % 2) as usize, lba, 3).unwrap();
        assert_eq!(r.read(1, 0, lba).unwrap(), block(lba, 3));
    }
    assert_eq!(r.state(1), BackingState::Running);
    r.flush(1).unwrap();

    // Restart with the failed device repaired: both re-attach (in the other order) and the
    // log replays — volume 1's cached data and volume 0's older cached data come back.
    let cache_img = r.cache.current_image();
    let imgs: Vec<Vec<u8>> = r.backings.iter().map(|b| b.current_image()).collect();
    r.shutdown();
    let rs = ReactorSet::start(ReactorConfig::unpinned(2)).unwrap();
    let rs2 = rs.clone();
    let vols = rs
        .block_on(0, move || async move {
            let set = cache::load("again", BdevDesc::new(SimDisk::from_image("c", 512, cache_img)), rs2, opts())
                .await
                .unwrap();
            let b1 = set
                .attach(BdevDesc::new(SimDisk::from_image("b1", 512, imgs[1].clone())), CacheMode::WriteThrough)
                .await
                .unwrap();
            let b0 = set
                .attach(BdevDesc::new(SimDisk::from_image("b0", 512, imgs[0].clone())), CacheMode::WriteThrough)
                .await
                .unwrap();
            (CachedBdev::new("v0", set.clone(), b0), CachedBdev::new("v1", set, b1))
        })
        .unwrap();
    let (d0, d1) = (BdevDesc::new(vols.0.clone()), BdevDesc::new(vols.1.clone()));
    for lba in 0..40u64 {
        let (a, b) = (d0.clone(), d1.clone());
        let (got0, got1) = rs
            .block_on(1, move || async move {
                let r0 = a.channel().unwrap().read(lba * BS as u64, IoBuf::new(BS)).await;
                let r1 = b.channel().unwrap().read(lba * BS as u64, IoBuf::new(BS)).await;
                (r0.buf.unwrap().to_vec(), r1.buf.unwrap().to_vec())
            })
            .unwrap();
        assert_eq!(got1, block(lba, 3), "volume 1 lba {lba} after restart");
        if lba < 20 {
            assert_eq!(got0, block(lba, 1), "volume 0 lba {lba}: its pre-failure data after restart");
        }
    }
    vols.0.cache_set().stop_migration();
    drop((vols, d0, d1));
    rs.stop();
}

/// Seed 000 test 5: a backing device that vanishes (ENODEV) stops its cached bdev after
/// the grace period, not before.
#[test]
fn vanished_backing_device_stops_after_the_grace_period() {
    let grace = Duration::from_millis(400);
    let r = rig(1, CacheMode::WriteBack, CacheOptions { backing_offline_grace: grace, ..opts() });
    r.write(0, 0, 1, 1).unwrap();
    r.backings[0].set_fail_all(Some(Errno::ENODEV));
    let t = Instant::now();
    let _ = r.read(0, 0, 500); // a miss: reaches the backing device and fails
    assert_eq!(r.state(0), BackingState::Running, "stopped before the grace period");
    r.wait_state(0, BackingState::Stopped, Duration::from_secs(5));
    assert!(t.elapsed() >= grace, "stopped after {:?}, grace is {grace:?}", t.elapsed());
    assert_eq!(r.write(0, 0, 2, 2), Err(Errno::EIO));
    r.shutdown();
}

/// Seed 002: transient conditions (ENOMEM) are retried with bounded backoff and never
/// surface as errors.
#[test]
fn transient_errors_are_retried_not_reported() {
    let r = rig(1, CacheMode::WriteThrough, opts());
    r.backings[0].set_fail_all(Some(Errno::ENOMEM));
    let b = r.backings[0].clone();
    let healer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        b.set_fail_all(None);
    });
    for lba in 0..10 {
        r.write(0, 0, lba, 4).unwrap();
    }
    healer.join().unwrap();
    for lba in 0..10 {
        assert_eq!(r.read(0, 1, lba).unwrap(), block(lba, 4));
    }
    assert_eq!(r.state(0), BackingState::Running);
    r.shutdown();
}

/// Seeds 001 and 004: a failed cache set is retired completely — its threads exit and
/// release the set — and a dead device still completes accepted I/O and can be dropped.
#[test]
fn failed_set_retires_completely_and_dead_devices_can_be_removed() {
    let r = rig(1, CacheMode::WriteBack, CacheOptions { stop_when_cache_set_failed: StopPolicy::Always, ..opts() });
    for lba in 0..300 {
        r.write(0, (lba % 2) as usize, lba, 1).unwrap();
    }
    // Under load: writers on both reactors keep going while the cache device fails and
    // writeback runs; every one of their I/Os must complete (success or EIO), none hangs.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..2usize)
        .map(|w| {
            let (d, rs, stop) = (r.vols[0].1.clone(), r.rs.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let d = d.clone();
                    let lba = (n * 7 + w as u64) % 300;
                    let _ = rs.block_on(w, move || async move {
                        d.channel()
                            .unwrap()
                            .write(lba * BS as u64, IoBuf::from_slice(&block(lba, 2)), false)
                            .await
                            .status
                    });
                    n += 1;
                }
                n
            })
        })
        .collect();
    r.set.request_drain();
    std::thread::sleep(Duration::from_millis(30));
    r.cache.set_fail_all(Some(Errno::EIO));
    let _ = r.flush(0);
    r.wait_state(0, BackingState::Stopped, Duration::from_secs(10));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        assert!(l.join().unwrap() > 0);
    }
    r.set.stop_migration();
    let name = r.set.name.clone();
    let weak = Arc::downgrade(&r.set);
    let Rig { rs, set, vols, .. } = r;
    drop(vols);
    drop(set);
    // Reactor-local state (the per-reactor logs) goes with the reactors.
    rs.stop();
    let t = Instant::now();
    while weak.strong_count() > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "cache set still referenced: {} owners", weak.strong_count());
        std::thread::sleep(Duration::from_millis(10));
    }
    let threads = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| *n == format!("migrate-{name}") || *n == format!("rescue-{name}"))
        .count();
    assert_eq!(threads, 0, "cache-set threads left behind");
}
