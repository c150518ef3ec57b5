//! Cache engine: format, write/read through the cached bdev, FLUSH, reload after a power
//! cut, two backing devices on one set, refusal of foreign or corrupt devices.

use std::sync::Arc;

use tiercache_engine::bdev::{Bdev, BdevDesc};
use tiercache_engine::cache::{self, CacheMode, CacheOptions, CachedBdev};
use tiercache_engine::reactor::{ReactorConfig, ReactorSet};
use tiercache_engine::sim::{CutMode, SimDisk};
use tiercache_engine::{Errno, IoBuf};

const BS: u32 = 4096;

fn opts() -> CacheOptions {
    CacheOptions { segment_size: 128 << 10, ..CacheOptions::default() }
}

fn pattern(lba: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; BS as usize];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&lba.to_le_bytes());
        chunk[8..16].copy_from_slice(&(version ^ i as u64).to_le_bytes());
    }
    v
}

struct Rig {
    set: ReactorSet,
    cache_disk: Arc<SimDisk>,
    backing_disk: Arc<SimDisk>,
}

fn make_rig(cache_mib: u64, backing_mib: u64) -> Rig {
    Rig {
        set: ReactorSet::start(ReactorConfig::unpinned(2)).unwrap(),
        cache_disk: SimDisk::new("cache", 512, cache_mib << 11),
        backing_disk: SimDisk::new("backing", 512, backing_mib << 11),
    }
}

fn build(
    rig: &Rig,
    cache_disk: Arc<SimDisk>,
    backing_disk: Arc<SimDisk>,
    format: bool,
) -> Result<Arc<CachedBdev>, String> {
    let rs = rig.set.clone();
    rig.set
        .block_on(0, move || async move {
            let cdesc = BdevDesc::new(cache_disk);
            let set = if format {
                cache::format("c0", cdesc, rs, opts()).await
            } else {
                cache::load("c0", cdesc, rs, opts()).await
            }
            .map_err(|e| e.to_string())?;
            let b = set.attach(BdevDesc::new(backing_disk), CacheMode::WriteBack).await.map_err(|e| e.to_string())?;
            Ok(CachedBdev::new("cached0", set, b))
        })
        .unwrap()
}

fn write(rig: &Rig, reactor: usize, desc: &BdevDesc, lba: u64, version: u64, fua: bool) {
    let d = desc.clone();
    let r = rig
        .set
        .block_on(reactor, move || async move {
            let ch = d.channel().unwrap();
            ch.write(lba * BS as u64, IoBuf::from_slice(&pattern(lba, version)), fua).await.status
        })
        .unwrap();
    r.unwrap();
}

fn read(rig: &Rig, reactor: usize, desc: &BdevDesc, lba: u64, n: usize) -> Vec<u8> {
    let d = desc.clone();
    rig.set
        .block_on(reactor, move || async move {
            let ch = d.channel().unwrap();
            let c = ch.read(lba * BS as u64, IoBuf::new(n * BS as usize)).await;
            c.status.unwrap();
            c.buf.unwrap().to_vec()
        })
        .unwrap()
}

fn flush(rig: &Rig, reactor: usize, desc: &BdevDesc) -> Result<(), Errno> {
    let d = desc.clone();
    rig.set.block_on(reactor, move || async move { d.channel().unwrap().flush().await.status }).unwrap()
}

#[test]
fn writes_read_back_from_ram_cache_device_and_across_reactors() {
    let rig = make_rig(8, 16);
    let cb = build(&rig, rig.cache_disk.clone(), rig.backing_disk.clone(), true).unwrap();
    let desc = BdevDesc::new(cb.clone());
    assert_eq!(cb.info().block_size, BS);
    // Written on reactor 0, read on both (RAM of another reactor goes through a message).
    for lba in 0..40 {
        write(&rig, (lba % 2) as usize, &desc, lba, 1, false);
    }
    for lba in 0..40 {
        assert_eq!(read(&rig, ((lba + 1) % 2) as usize, &desc, lba, 1), pattern(lba, 1), "lba {lba}");
    }
    // Overwrite some; a multi-block read mixes new versions, old ones and misses.
    for lba in (0..40).step_by(3) {
        write(&rig, 1, &desc, lba, 2, false);
    }
    flush(&rig, 0, &desc).unwrap();
    let got = read(&rig, 0, &desc, 30, 20);
    for i in 0..20u64 {
        let lba = 30 + i;
        let want = if lba >= 40 { vec![0; BS as usize] } else { pattern(lba, if lba % 3 == 0 { 2 } else { 1 }) };
        assert_eq!(&got[i as usize * BS as usize..(i as usize + 1) * BS as usize], &want[..], "lba {lba}");
    }
    cb.cache_set().stop_migration();
    rig.set.stop();
}

#[test]
fn flushed_writes_survive_a_power_cut_and_unflushed_ones_are_old_or_new() {
    let rig = make_rig(8, 16);
    let cb = build(&rig, rig.cache_disk.clone(), rig.backing_disk.clone(), true).unwrap();
    let desc = BdevDesc::new(cb.clone());
    for lba in 0..64 {
        write(&rig, (lba % 2) as usize, &desc, lba, 1, false);
    }
    flush(&rig, 1, &desc).unwrap();
    for lba in 0..64 {
        write(&rig, 0, &desc, lba, 2, false);
    }
    write(&rig, 1, &desc, 100, 7, true); // FUA: durable without a FLUSH
    let cache_img = rig.cache_disk.cut_power(42, CutMode { survive_probability: 0.5, tear_one: true });
    let backing_img = rig.backing_disk.cut_power(43, CutMode::DROP_ALL);
    cb.cache_set().stop_migration();
    drop(cb);
    rig.set.stop();

    let rig2 = make_rig(8, 16);
    let cdisk = SimDisk::from_image("cache", 512, cache_img);
    let bdisk = SimDisk::from_image("backing", 512, backing_img);
    let cb2 = build(&rig2, cdisk, bdisk, false).unwrap();
    let desc2 = BdevDesc::new(cb2.clone());
    for lba in 0..64 {
        let got = read(&rig2, 0, &desc2, lba, 1);
        assert!(
            got == pattern(lba, 1) || got == pattern(lba, 2),
            "lba {lba}: neither the flushed nor the later version"
        );
    }
    assert_eq!(read(&rig2, 1, &desc2, 100, 1), pattern(100, 7), "FUA write lost");
    cb2.cache_set().stop_migration();
    rig2.set.stop();
}

#[test]
fn foreign_and_corrupt_cache_devices_are_refused_not_reformatted() {
    let rig = make_rig(8, 16);
    // Never formatted: refused.
    let err = build(&rig, rig.cache_disk.clone(), rig.backing_disk.clone(), false).unwrap_err();
    assert!(err.contains("not a tiercache cache device"), "{err}");
    // Formatted, then both superblocks damaged: refused, contents untouched.
    let cb = build(&rig, rig.cache_disk.clone(), rig.backing_disk.clone(), true).unwrap();
    cb.cache_set().stop_migration();
    let mut img = rig.cache_disk.current_image();
    img[100] ^= 0xff;
    img[4096 + 100] ^= 0xff;
    let damaged = SimDisk::from_image("cache", 512, img.clone());
    let err = build(&rig, damaged.clone(), SimDisk::new("b2", 512, 16 << 11), false).unwrap_err();
    assert!(err.to_lowercase().contains("superblock") || err.contains("crc") || err.contains("checksum"), "{err}");
    assert_eq!(damaged.current_image(), img, "a refused device must not be written");
    // A backing device of another cache set is refused.
    let rig_b = build(&rig, SimDisk::new("cache2", 512, 8 << 11), rig.backing_disk.clone(), true).unwrap_err();
    assert!(rig_b.contains("another cache set") || rig_b.contains("oreign") || rig_b.contains("belongs"), "{rig_b}");
    rig.set.stop();
}

#[test]
fn two_backing_devices_share_one_cache_and_reattach_in_any_order_after_restart() {
    let rig = make_rig(8, 16);
    let b0 = rig.backing_disk.clone();
    let b1 = SimDisk::new("backing1", 512, 16 << 11);
    let (cache_disk, rs) = (rig.cache_disk.clone(), rig.set.clone());
    let (b0c, b1c) = (b0.clone(), b1.clone());
    let (c0, c1) = rig
        .set
        .block_on(0, move || async move {
            let set = cache::format("c0", BdevDesc::new(cache_disk), rs, opts()).await.unwrap();
            let a = set.attach(BdevDesc::new(b0c), CacheMode::WriteBack).await.unwrap();
            let b = set.attach(BdevDesc::new(b1c), CacheMode::WriteBack).await.unwrap();
            assert_ne!(a.idx, b.idx);
            (CachedBdev::new("cached0", set.clone(), a), CachedBdev::new("cached1", set, b))
        })
        .unwrap();
    let (d0, d1) = (BdevDesc::new(c0.clone()), BdevDesc::new(c1.clone()));
    // Same LBAs on both volumes, different data: records must not mix devices.
    for lba in 0..32 {
        write(&rig, 0, &d0, lba, 10, false);
        write(&rig, 1, &d1, lba, 20, false);
    }
    flush(&rig, 0, &d1).unwrap();
    let cache_img = rig.cache_disk.cut_power(7, CutMode::DROP_ALL);
    let (i0, i1) = (b0.cut_power(8, CutMode::DROP_ALL), b1.cut_power(9, CutMode::DROP_ALL));
    c0.cache_set().stop_migration();
    drop((c0, c1, d0, d1));
    rig.set.stop();

    // Restart: the devices appear in the other order; each re-attaches by the UUID in
    // its header and the log replays both volumes' blocks.
    let rig2 = make_rig(8, 16);
    let rs = rig2.set.clone();
    let cdisk = SimDisk::from_image("cache", 512, cache_img);
    let (n0, n1) = (SimDisk::from_image("b0", 512, i0), SimDisk::from_image("b1", 512, i1));
    let (c0, c1) = rig2
        .set
        .block_on(0, move || async move {
            let set = cache::load("c0", BdevDesc::new(cdisk), rs, opts()).await.unwrap();
            let b = set.attach(BdevDesc::new(n1), CacheMode::WriteBack).await.unwrap();
            let a = set.attach(BdevDesc::new(n0), CacheMode::WriteBack).await.unwrap();
            (CachedBdev::new("cached0", set.clone(), a), CachedBdev::new("cached1", set, b))
        })
        .unwrap();
    let (d0, d1) = (BdevDesc::new(c0.clone()), BdevDesc::new(c1.clone()));
    for lba in 0..32 {
        assert_eq!(read(&rig2, 0, &d0, lba, 1), pattern(lba, 10), "volume 0 lba {lba}");
        assert_eq!(read(&rig2, 1, &d1, lba, 1), pattern(lba, 20), "volume 1 lba {lba}");
    }
    c0.cache_set().stop_migration();
    rig2.set.stop();
}

#[test]
fn writeback_drains_everything_to_the_backing_device() {
    let rig = make_rig(8, 16);
    let cb = build(&rig, rig.cache_disk.clone(), rig.backing_disk.clone(), true).unwrap();
    let desc = BdevDesc::new(cb.clone());
    for lba in 0..200 {
        write(&rig, (lba % 2) as usize, &desc, lba, 3, false);
    }
    let set = cb.cache_set().clone();
    set.request_drain();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while set.dirty_blocks() > 0 || set.superblock().writeback_seq == 0 {
        assert!(std::time::Instant::now() < deadline, "drain did not finish: {} dirty", set.dirty_blocks());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The backing device itself now holds every block (data area after the 1 MiB header).
    let img = rig.backing_disk.current_image();
    for lba in 0..200u64 {
        let off = (1 << 20) + lba as usize * BS as usize;
        assert_eq!(&img[off..off + BS as usize], &pattern(lba, 3)[..], "backing lba {lba}");
    }
    set.stop_migration();
    rig.set.stop();
}

#[test]
fn clean_cached_data_stays_warm_across_a_restart() {
    let rig = make_rig(8, 16);
    let cb = build(&rig, rig.cache_disk.clone(), rig.backing_disk.clone(), true).unwrap();
    let desc = BdevDesc::new(cb.clone());
    for lba in 0..60 {
        write(&rig, (lba % 2) as usize, &desc, lba, 4, false);
    }
    let set = cb.cache_set().clone();
    set.request_drain();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while set.dirty_blocks() > 0 || set.superblock().writeback_seq == 0 {
        assert!(std::time::Instant::now() < deadline, "drain did not finish");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(set.superblock().reclaim_seq, 0, "nothing needed reclaiming: the clean data stays");
    flush(&rig, 0, &desc).unwrap();
    let (ci, bi) = (rig.cache_disk.cut_power(1, CutMode::DROP_ALL), rig.backing_disk.cut_power(2, CutMode::DROP_ALL));
    set.stop_migration();
    drop((cb, desc, set));
    rig.set.stop();

    let rig2 = make_rig(8, 16);
    let cb2 = build(&rig2, SimDisk::from_image("c", 512, ci), SimDisk::from_image("b", 512, bi), false).unwrap();
    let desc2 = BdevDesc::new(cb2.clone());
    let set2 = cb2.cache_set().clone();
    assert_eq!(set2.dirty_blocks(), 0, "written-back data must come back clean");
    let hits = set2.counters.read_hits.load(std::sync::atomic::Ordering::Relaxed);
    for lba in 0..60 {
        assert_eq!(read(&rig2, 0, &desc2, lba, 1), pattern(lba, 4));
    }
    let hits_after = set2.counters.read_hits.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(hits_after - hits, 60, "clean data was not kept warm");
    set2.stop_migration();
    rig2.set.stop();
}

/// A FUA write that goes around the cache over a block whose newest cached record is a
/// tombstone still only in RAM (an earlier direct write's, not FLUSHed yet) must make
/// that supersession durable too: otherwise a power cut loses the tombstone, replay
/// serves the older cached version, and the FUA data on the backing device is hidden.
#[test]
fn a_fua_direct_write_over_an_unflushed_tombstone_survives_a_power_cut() {
    let rig = make_rig(8, 16);
    let o =
        CacheOptions { seal_idle: std::time::Duration::from_secs(30), promote_after: 0, seq_cutoff_bytes: 0, ..opts() };
    let (rs, cdisk, bdisk) = (rig.set.clone(), rig.cache_disk.clone(), rig.backing_disk.clone());
    let cb = rig
        .set
        .block_on(0, move || async move {
            let set = cache::format("c0", BdevDesc::new(cdisk), rs, o).await.unwrap();
            let b = set.attach(BdevDesc::new(bdisk), CacheMode::WriteBack).await.unwrap();
            CachedBdev::new("cached0", set, b)
        })
        .unwrap();
    let desc = BdevDesc::new(cb.clone());
    const X: u64 = 5;
    // Version 1, cached dirty and durable on the cache device.
    write(&rig, 0, &desc, X, 1, false);
    flush(&rig, 0, &desc).unwrap();
    // No writeback from here on (its durability rounds would seal the tombstone below).
    cb.cache_set().stop_migration();
    cb.set_mode(CacheMode::WriteAround);
    // Version 2 goes around: a tombstone in reactor 0's open segment, in RAM only.
    write(&rig, 0, &desc, X, 2, false);
    // Version 3 goes around with FUA: it must be what a power cut leaves.
    write(&rig, 1, &desc, X, 3, true);
    let cache_img = rig.cache_disk.cut_power(1, CutMode::DROP_ALL);
    let backing_img = rig.backing_disk.cut_power(2, CutMode::DROP_ALL);
    drop(desc);
    drop(cb);
    rig.set.stop();

    let rig2 = make_rig(8, 16);
    let cb2 = build(
        &rig2,
        SimDisk::from_image("cache", 512, cache_img),
        SimDisk::from_image("backing", 512, backing_img),
        false,
    )
    .unwrap();
    let desc2 = BdevDesc::new(cb2.clone());
    let got = read(&rig2, 0, &desc2, X, 1);
    assert!(
        got == pattern(X, 3),
        "the FUA write is hidden by an older cached version (version 1: {})",
        got == pattern(X, 1)
    );
    cb2.cache_set().stop_migration();
    rig2.set.stop();
}
