//! The generator run in-process against malloc and null bdevs: counts add up, verify finds
//! nothing on a good device and every corrupted block on a bad one.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tiercache_bdevs::malloc::MallocBdev;
use tiercache_bdevs::null::NullBdev;
use tiercache_engine::bdev::Bdev;
use tiercache_perf::pattern::MAGIC;
use tiercache_perf::{JobConfig, Limit, VerifyPass, Workload};

use common::{run, CorruptingBdev};

fn malloc(name: &str, bytes: u64) -> Arc<dyn Bdev> {
    MallocBdev::create(name, bytes / 4096, 4096).expect("malloc bdev")
}

#[test]
fn counts_add_up_for_every_workload_on_malloc_and_null() {
    let null: Arc<dyn Bdev> = NullBdev::create("t-null", 1 << 18, 4096).unwrap();
    let mem = malloc("t-counts", 8 << 20);
    for (bdev, w) in [
        (&null, Workload::Randread),
        (&null, Workload::Write),
        (&mem, Workload::Randrw),
        (&mem, Workload::Read),
        (&mem, Workload::Randwrite),
    ] {
        let mut cfg = JobConfig::new(w, 8192, 5, Limit::Count(10_007), 11);
        cfg.read_pct = 70;
        let r = run(bdev.clone(), &cfg, 2);
        let t = &r.total;
        assert_eq!(t.ios, 10_007, "{w:?}");
        assert_eq!(t.reads + t.writes, t.ios);
        assert_eq!(r.cores.len(), 2);
        assert_eq!(r.cores.iter().map(|c| c.ios).sum::<u64>(), t.ios);
        // The budget is split evenly: 5004 + 5003.
        let mut per: Vec<u64> = r.cores.iter().map(|c| c.ios).collect();
        per.sort();
        assert_eq!(per, vec![5003, 5004]);
        assert_eq!(t.bytes, t.ios * 8192);
        assert_eq!(t.errors, 0);
        assert!(r.ok);
        let hist_total: u64 = r.histogram.as_ref().unwrap().iter().map(|b| b.count).sum();
        assert_eq!(hist_total, t.ios, "every I/O has one latency sample");
        match w {
            Workload::Randread | Workload::Read => assert_eq!(t.writes, 0),
            Workload::Write | Workload::Randwrite => assert_eq!(t.reads, 0),
            _ => {
                let frac = t.reads as f64 / t.ios as f64;
                assert!((0.66..0.74).contains(&frac), "randrw -M 70 gave {frac} reads");
            }
        }
        let l = &t.latency_us;
        assert!(l.min <= l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p99_9 && l.p99_9 <= l.p100);
        assert!(t.iops > 0.0 && t.mib_s > 0.0);
    }
}

#[test]
fn time_limit_and_flush_every_are_honoured() {
    let mem = malloc("t-time", 4 << 20);
    let cfg = JobConfig::new(Workload::Randread, 4096, 4, Limit::Time(Duration::from_millis(300)), 3);
    let r = run(mem.clone(), &cfg, 1);
    assert!(r.total.ios > 0);
    assert!((0.29..2.0).contains(&r.total.elapsed_s), "ran {} s", r.total.elapsed_s);

    let mut cfg = JobConfig::new(Workload::Randwrite, 4096, 4, Limit::Count(1000), 3);
    cfg.flush_every = Some(100);
    let r = run(mem, &cfg, 1);
    assert_eq!(r.total.writes, 1000);
    assert_eq!(r.flush.count, 10);
}

#[test]
fn verify_finds_no_mismatch_on_malloc() {
    let mem = malloc("t-verify-ok", 4 << 20);
    // 16 KiB I/Os = 4 blocks each, each with its own header.
    let cfg = JobConfig::new(Workload::Verify, 16384, 8, Limit::Count(4000), 77);
    let r = run(mem, &cfg, 2);
    let v = r.verify.as_ref().expect("verify section");
    assert_eq!(v.mismatches, 0, "{:?}", v.details.first());
    assert_eq!(r.total.reads, 2000);
    assert_eq!(r.total.writes, 2000);
    assert_eq!(v.blocks_checked, 2000 * 4);
    assert!(r.ok);
}

#[test]
fn verify_reports_every_corrupted_block() {
    let bad: HashSet<u64> = [3, 100, 101, 255].into_iter().collect();
    let base = malloc("t-verify-bad", 1 << 20); // 256 blocks
    let bdev: Arc<dyn Bdev> = Arc::new(CorruptingBdev { inner: base, bad_lbas: bad.clone(), flip_at: 2000 });
    // One write + one read of each block exactly once.
    let cfg = JobConfig::new(Workload::Verify, 4096, 4, Limit::Count(2 * 256), 5);
    let r = run(bdev, &cfg, 1);
    let v = r.verify.as_ref().unwrap();
    assert_eq!(v.blocks_checked, 256);
    assert_eq!(v.mismatches, 4);
    assert!(!r.ok);
    let lbas: HashSet<u64> = v.details.iter().map(|m| m.lba).collect();
    assert_eq!(lbas, bad);
    for m in &v.details {
        assert_eq!(m.expected, m.got, "the header survived; the payload did not");
        assert_eq!(m.expected.lba, m.lba);
        assert_ne!(m.got_crc_computed, m.got.crc, "crc32c catches the flipped byte");
        assert_eq!((m.first_diff_byte, m.diff_bytes), (2000, 1));
    }
}

#[test]
fn verify_read_pass_checks_a_previous_write_pass() {
    let mem = malloc("t-verify-seeds", 2 << 20); // 512 blocks
    let mut cfg = JobConfig::new(Workload::Verify, 8192, 4, Limit::Count(256), 1234);
    cfg.verify_pass = VerifyPass::Write;
    let w = run(mem.clone(), &cfg, 2);
    assert_eq!((w.total.writes, w.total.reads), (256, 0));

    cfg.verify_pass = VerifyPass::Read;
    let same = run(mem.clone(), &cfg, 2);
    let v = same.verify.as_ref().unwrap();
    assert_eq!((v.blocks_checked, v.mismatches), (512, 0));

    cfg.seed = 999; // "verify with another seed": every block is foreign
    let other = run(mem, &cfg, 2);
    let v = other.verify.as_ref().unwrap();
    assert_eq!((v.blocks_checked, v.mismatches), (512, 512));
    assert!(!other.ok);
    let m = &v.details[0];
    assert_eq!((m.expected.seed, m.got.seed), (999, 1234));
    assert_eq!(m.got.magic, MAGIC);
    assert_eq!(m.got.lba, m.lba);
    assert_eq!(m.got_crc_computed, m.got.crc, "the block itself is intact, just not ours");
    assert_eq!(m.first_diff_byte, 16, "first difference is the seed field");
}
