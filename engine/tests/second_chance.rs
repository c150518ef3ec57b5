//! Second chance at reclaim (copy-forward of hot clean blocks) and promotion off the read
//! path: a block hit since it was cached survives the reclaim of its segment while a cold
//! one is evicted, writes racing copy-forward are never lost, and promotion skips instead
//! of waiting when the log has no free space.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tiercache_engine::bdev::{Bdev, BdevChannel, BdevDesc, BdevInfo, IoFuture, IoRequest, IoType};
use tiercache_engine::cache::{self, CacheMode, CacheOptions, CacheSet, CachedBdev};
use tiercache_engine::reactor::{self, ReactorConfig, ReactorSet};
use tiercache_engine::sim::SimDisk;
use tiercache_engine::Errno;
use tiercache_engine::IoBuf;

mod common;
use common::{block, BS};

/// The version a block holds (0: never written), or an error if it is not a whole
/// version of `lba`.
fn version_of(lba: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|b| *b == 0) {
        return Ok(0);
    }
    let v = u64::from_le_bytes(data[8..16].try_into().unwrap()) / 1000;
    if data != block(lba, v).as_slice() {
        return Err(format!(
            "block {lba}: torn or misdirected data (says lba {})",
            u64::from_le_bytes(data[..8].try_into().unwrap())
        ));
    }
    Ok(v)
}

/// The cache device, with a gate: while `hold` is set, reads wait (the reactor runs other
/// tasks meanwhile). Copy-forward reads its blocks from the cache device, so a test can
/// stop it between its listing of the referenced blocks and its installs, land writes
/// there, and let it go on.
struct GatedReads {
    inner: Arc<SimDisk>,
    info: BdevInfo,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    hold: AtomicBool,
    /// Reads waiting at the gate now.
    held: AtomicU64,
}

struct GatedChannel(std::rc::Rc<tiercache_engine::bdev::IoChannel>, Arc<Gate>);

impl Bdev for GatedReads {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        Ok(Box::new(GatedChannel(BdevDesc::new(self.inner.clone()).channel()?, self.gate.clone())))
    }
    fn driver(&self) -> &'static str {
        "gated-reads"
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl BdevChannel for GatedChannel {
    fn submit(&self, io: IoRequest) -> IoFuture {
        let (ch, gate) = (self.0.clone(), self.1.clone());
        IoFuture::boxed(async move {
            if io.io_type == IoType::Read && gate.hold.load(Ordering::SeqCst) {
                gate.held.fetch_add(1, Ordering::SeqCst);
                while gate.hold.load(Ordering::SeqCst) {
                    reactor::sleep(Duration::from_micros(100)).await;
                }
                gate.held.fetch_sub(1, Ordering::SeqCst);
            }
            ch.submit(io).await
        })
    }
}

struct Rig {
    rs: ReactorSet,
    set: Arc<CacheSet>,
    cb: Arc<CachedBdev>,
    desc: BdevDesc,
    backing: Arc<SimDisk>,
    gate: Arc<Gate>,
}

/// Two reactors; the migration reactor (where copies are placed) is reactor 1. The cache
/// is 8 MiB: 56 segments of 31 slots (1,736 blocks).
fn rig(opts: CacheOptions) -> Rig {
    let rs = ReactorSet::start(ReactorConfig::unpinned(2)).unwrap();
    let backing = SimDisk::new("b", 512, 64 << 11);
    let gate = Arc::new(Gate::default());
    let (rs2, b2, g2) = (rs.clone(), backing.clone(), gate.clone());
    let cb = rs
        .block_on(0, move || async move {
            let c = SimDisk::new("c", 512, 8 << 11);
            let info = c.info().clone();
            let cache = BdevDesc::new(Arc::new(GatedReads { inner: c, info, gate: g2 }));
            let set = cache::format("sc", cache, rs2, opts).await.unwrap();
            let b = set.attach(BdevDesc::new(b2), CacheMode::WriteBack).await.unwrap();
            CachedBdev::new("v", set, b)
        })
        .unwrap();
    Rig { rs, set: cb.cache_set().clone(), desc: BdevDesc::new(cb.clone()), cb, backing, gate }
}

fn opts() -> CacheOptions {
    CacheOptions { segment_size: 128 << 10, promote_after: 1, seq_cutoff_bytes: 0, ..CacheOptions::default() }
}

impl Rig {
    fn read(&self, r: usize, lba: u64) -> Vec<u8> {
        let d = self.desc.clone();
        let data = self
            .rs
            .block_on(r, move || async move {
                let c = d.channel().unwrap().read(lba * BS as u64, IoBuf::new(BS)).await;
                c.status.unwrap();
                c.buf.unwrap().to_vec()
            })
            .unwrap();
        self.settle();
        data
    }
    /// Whether reading `lba` is a cache hit.
    fn read_hits(&self, r: usize, lba: u64) -> bool {
        let before = self.c(&self.set.counters.read_hits);
        self.read(r, lba);
        self.c(&self.set.counters.read_hits) > before
    }
    fn write(&self, r: usize, lba: u64, v: u64) {
        common::write_block(&self.rs, &self.desc, r, lba, v);
    }
    fn settle(&self) {
        let t = Instant::now();
        while self.set.counters.promotions_in_flight.load(Ordering::Acquire) > 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "promotions never finished");
            std::thread::yield_now();
        }
    }
    fn stats(&self) -> String {
        let c = &self.set.counters;
        format!(
            "reclaimed {} segments, copied forward {}, copies dropped {}, promotions {} stale {} skipped {}",
            self.c(&c.segments_reclaimed),
            self.c(&c.copy_forwards),
            self.c(&c.copy_forwards_dropped),
            self.c(&c.promotions),
            self.c(&c.promotions_stale),
            self.c(&c.promotions_skipped)
        )
    }
    fn c(&self, a: &std::sync::atomic::AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
    fn done(self) {
        self.set.stop_migration();
        drop(self.cb);
        self.rs.stop();
    }
}

#[test]
fn a_block_hit_since_it_was_cached_survives_reclaim_and_a_cold_one_is_evicted() {
    let r = rig(opts());
    // Cached together, in one segment (31 slots): one hot block, two cold ones, ...,
    // each promoted on its first miss. At most 3/4 of a segment is copied forward, so the
    // 10 hot blocks all qualify.
    let hot: Vec<u64> = (0..10).map(|i| i * 5).collect();
    let cold: Vec<u64> = (0..20).map(|i| (i / 2) * 5 + 1 + i % 2).collect();
    for (&h, c) in hot.iter().zip(cold.chunks(2)) {
        assert!(!r.read_hits(0, h));
        assert!(!r.read_hits(0, c[0]));
        assert!(!r.read_hits(0, c[1]));
    }
    for &h in &hot {
        assert!(r.read_hits(0, h), "hot block {h} was not cached");
    }
    // Turn the log over ~6 times with blocks read once; the hot set is read again every
    // 400 reads (far less than the cache's 1,736 blocks).
    let reclaimed0 = r.c(&r.set.counters.segments_reclaimed);
    for i in 0..10_000u64 {
        r.read((i % 2) as usize, 1000 + i);
        if i % 400 == 399 {
            for &h in &hot {
                if !r.read_hits((i % 2) as usize, h) {
                    panic!("hot block {h} evicted after {i} other reads: {}", r.stats());
                }
            }
        }
    }
    let reclaimed = r.c(&r.set.counters.segments_reclaimed) - reclaimed0;
    let copied = r.c(&r.set.counters.copy_forwards);
    eprintln!(
        "reclaimed {reclaimed} segments, copied forward {copied}, dropped {}, promotions {} skipped {}",
        r.c(&r.set.counters.copy_forwards_dropped),
        r.c(&r.set.counters.promotions),
        r.c(&r.set.counters.promotions_skipped)
    );
    assert!(reclaimed >= 3 * 56, "the log did not turn over: {reclaimed} segments reclaimed");
    assert!(copied >= hot.len() as u64, "hot blocks were never copied forward ({copied})");
    for &h in &hot {
        assert!(r.read_hits(1, h), "hot block {h} evicted");
        assert_eq!(r.read(0, h), vec![0u8; BS]);
    }
    for &c in &cold {
        assert!(!r.read_hits(1, c), "cold block {c} was never evicted");
    }
    r.done();
}

/// Writes racing copy-forward: reactor 0 writes new versions of a hot set while reactor 1
/// (the migration reactor, where copies are placed) reads it — setting referenced bits —
/// and reads fresh blocks that keep the log turning over, so reclaim copies hot blocks
/// forward while they are being overwritten. No read may return an older version than the
/// last completed write, and after a drain the backing device holds the last versions.
/// Seeded; replay with TIERCACHE_CF_SEED.
#[test]
fn writes_racing_copy_forward_are_never_lost() {
    let seed: u64 = std::env::var("TIERCACHE_CF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_0c0f);
    eprintln!("copy-forward race seed {seed} (replay with TIERCACHE_CF_SEED={seed})");
    let r = rig(CacheOptions { writeback_free_low_percent: 20, ..opts() });
    let blocks = 48u64;
    let mut last = vec![0u64; blocks as usize];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut filler = 0u64;
    let started = Instant::now();
    for round in 0..60u64 {
        let writes: Vec<u64> = (0..rng.gen_range(20..80)).map(|_| rng.gen_range(0..blocks)).collect();
        // Reactor 1 (the migration reactor) reads hot blocks (setting referenced bits) and
        // writes some, between copy-forward's listing and its installs.
        let reads: Vec<(u64, Option<u64>)> =
            (0..64).map(|_| (rng.gen_range(0..blocks), rng.gen_bool(0.5).then(|| rng.gen_range(0..blocks)))).collect();
        let floor = last.clone();
        let v = round + 1;
        let (d0, d1) = (r.desc.clone(), r.desc.clone());
        let w = r.rs.run_on(0, move || async move {
            let ch = d0.channel().unwrap();
            for lba in writes {
                ch.write(lba * BS as u64, IoBuf::from_slice(&block(lba, v)), false).await.status.unwrap();
            }
        });
        let fill0 = filler;
        filler += 250;
        let rd = r.rs.run_on(1, move || async move {
            let ch = d1.channel().unwrap();
            let mut bad = Vec::new();
            for (k, (lba, write)) in reads.into_iter().enumerate() {
                if let Some(w) = write {
                    ch.write(w * BS as u64, IoBuf::from_slice(&block(w, v)), false).await.status.unwrap();
                }
                let c = ch.read(lba * BS as u64, IoBuf::new(BS)).await;
                c.status.unwrap();
                match version_of(lba, &c.buf.unwrap()) {
                    Ok(got) if got >= floor[lba as usize] && got <= v => {}
                    Ok(got) => bad.push(format!("lba {lba}: version {got}, expected {}..={v}", floor[lba as usize])),
                    Err(e) => bad.push(e),
                }
                // Fresh blocks, promoted on their first miss: the log keeps turning over.
                for f in 0..4 {
                    let l = 1000 + (fill0 + k as u64 * 4 + f) % 14_000;
                    ch.read(l * BS as u64, IoBuf::new(BS)).await.status.unwrap();
                }
            }
            bad
        });
        let (wr, bad) = futures::executor::block_on(async { futures::join!(w, rd) });
        wr.unwrap();
        let bad = bad.unwrap();
        assert!(bad.is_empty(), "round {round}: concurrent reads went stale: {bad:?} (seed {seed})");
        for (lba, l) in last.iter_mut().enumerate() {
            // Every block written this round now holds version v.
            let got = version_of(lba as u64, &r.read(lba % 2, lba as u64)).unwrap();
            assert!(got >= *l, "round {round} lba {lba}: version {got} older than {l} (seed {seed})");
            *l = got;
        }
        if round % 10 == 9 {
            r.set.request_drain();
        }
    }
    // Every version written was the last one read back; now check the backing device.
    r.set.request_drain();
    let t = Instant::now();
    while r.set.dirty_blocks() > 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "no drain");
        std::thread::sleep(Duration::from_millis(5));
    }
    let off = r.cb.backing().data_offset as usize;
    let image = r.backing.current_image();
    for (lba, &l) in last.iter().enumerate() {
        let data = &image[off + lba * BS..off + (lba + 1) * BS];
        assert_eq!(version_of(lba as u64, data), Ok(l), "backing device, lba {lba} after the drain (seed {seed})");
        assert_eq!(version_of(lba as u64, &r.read(0, lba as u64)), Ok(l), "lba {lba} after the drain (seed {seed})");
    }
    let copied = r.c(&r.set.counters.copy_forwards);
    eprintln!(
        "seed {seed}: {:?}, reclaimed {} segments, copied forward {copied}, copies dropped {}, \
         promotions {} stale {} skipped {}",
        started.elapsed(),
        r.c(&r.set.counters.segments_reclaimed),
        r.c(&r.set.counters.copy_forwards_dropped),
        r.c(&r.set.counters.promotions),
        r.c(&r.set.counters.promotions_stale),
        r.c(&r.set.counters.promotions_skipped),
    );
    assert!(copied > 0, "copy-forward never ran: the race was not exercised (seed {seed})");
    r.done();
}

/// The race made certain: reclaim is stopped inside copy-forward (its cache read of the
/// referenced blocks held at the gate), a seeded subset of those blocks is overwritten on
/// either reactor, and the copy is let go. Each overwritten block must be dropped by the
/// copy (never installed over the write), every other one copied. Seeded; replay with
/// TIERCACHE_CF_SEED.
#[test]
fn a_write_landing_inside_a_copy_forward_wins() {
    let seed: u64 = std::env::var("TIERCACHE_CF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_0c10);
    eprintln!("copy-forward gate seed {seed} (replay with TIERCACHE_CF_SEED={seed})");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let r = rig(opts());
    // Hot blocks, cached (first miss) and hit (referenced) before anything else: they sit
    // in the oldest segment, reclaimed first. At most 23 (3/4 of a segment) are copied.
    let n = rng.gen_range(4..=15u64);
    let hot: Vec<u64> = (0..n).map(|i| 2 * i + rng.gen_range(0..2)).collect();
    for &h in &hot {
        r.write(0, h, 1);
    }
    r.set.request_drain();
    let t = Instant::now();
    while r.set.dirty_blocks() > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no drain");
        std::thread::sleep(Duration::from_millis(1));
    }
    for &h in &hot {
        assert!(r.read_hits(1, h), "hot block {h} not cached");
    }
    // Close the gate and turn the log over until copy-forward waits at it.
    r.gate.hold.store(true, Ordering::SeqCst);
    let mut filler = 1000;
    let t = Instant::now();
    while r.gate.held.load(Ordering::SeqCst) == 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "reclaim never reached the hot segment: {}", r.stats());
        r.read((filler % 2) as usize, filler);
        filler += 1;
    }
    let (copied0, dropped0) = (r.c(&r.set.counters.copy_forwards), r.c(&r.set.counters.copy_forwards_dropped));
    // Overwrite some of the hot blocks while the copy is in flight.
    let mut last: Vec<u64> = vec![1; hot.len()];
    let mut written = 0;
    for (k, &h) in hot.iter().enumerate() {
        if rng.gen_bool(0.5) {
            for _ in 0..rng.gen_range(1..=2) {
                last[k] += 1;
                r.write(rng.gen_range(0..2), h, last[k]);
            }
            written += 1;
        }
    }
    r.gate.hold.store(false, Ordering::SeqCst);
    let t = Instant::now();
    while r.c(&r.set.counters.copy_forwards) + r.c(&r.set.counters.copy_forwards_dropped) < copied0 + dropped0 + n {
        assert!(t.elapsed() < Duration::from_secs(10), "copy-forward did not finish: {}", r.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
    let copied = r.c(&r.set.counters.copy_forwards) - copied0;
    let dropped = r.c(&r.set.counters.copy_forwards_dropped) - dropped0;
    eprintln!("seed {seed}: {n} hot blocks, {written} overwritten during the copy; copied {copied}, dropped {dropped}");
    for (k, &h) in hot.iter().enumerate() {
        for rr in 0..2 {
            let got = version_of(h, &r.read(rr, h));
            assert_eq!(got, Ok(last[k]), "block {h} read on reactor {rr} (seed {seed})");
        }
    }
    assert_eq!(dropped, written, "copies of overwritten blocks must be dropped (seed {seed})");
    assert_eq!(copied, n - written, "the other hot blocks must be copied forward (seed {seed})");
    // And the backing device ends with the writes, not the copies.
    r.set.request_drain();
    let t = Instant::now();
    while r.set.dirty_blocks() > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no drain");
        std::thread::sleep(Duration::from_millis(1));
    }
    let off = r.cb.backing().data_offset as usize;
    let image = r.backing.current_image();
    for (k, &h) in hot.iter().enumerate() {
        let data = &image[off + h as usize * BS..off + (h as usize + 1) * BS];
        assert_eq!(version_of(h, data), Ok(last[k]), "backing device, block {h} (seed {seed})");
    }
    r.done();
}

/// With no free segment and the open segment full, a promoting read completes and its
/// promotion is skipped (counted), instead of waiting for log space.
#[test]
fn promotion_skips_instead_of_waiting_for_log_space() {
    // Writeback off (100%), no reclaim (free segments only run out): the log fills with
    // dirty data.
    let r = rig(CacheOptions { writeback_percent: 100, writeback_free_low_percent: 1, ..opts() });
    r.set.stop_migration();
    let d = r.desc.clone();
    // 55 of the 56 segments: the last free one is left for the promotions.
    r.rs.block_on(0, move || async move {
        let ch = d.channel().unwrap();
        for i in 0..55 * 31u64 {
            ch.write(i * BS as u64, IoBuf::from_slice(&block(i, 1)), false).await.status.unwrap();
        }
    })
    .unwrap();
    let skipped0 = r.c(&r.set.counters.promotions_skipped);
    let t = Instant::now();
    for i in 0..200u64 {
        let lba = 5000 + i;
        assert_eq!(r.read(0, lba), vec![0u8; BS]);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "promoting reads waited for log space");
    let skipped = r.c(&r.set.counters.promotions_skipped) - skipped0;
    eprintln!("promotions {} skipped {skipped}", r.c(&r.set.counters.promotions));
    assert!(skipped > 0, "no promotion was skipped with the log full");
    assert!(r.c(&r.set.counters.promotions) <= 31 + 31, "promoted more than the free space");
    r.done();
}
