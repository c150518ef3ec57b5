//! Per-backend tests: error-injection modes with exact counts, delay timing, uring file
//! geometry, and each module's `driver_specific` / `config_call`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tiercache_bdevs::channel_seed;
use tiercache_bdevs::delay::{DelayBdev, DelayLatencies, LatencyKind};
use tiercache_bdevs::error::{ErrorBdev, ErrorKind, ErrorSpec, Trigger};
use tiercache_bdevs::malloc::MallocBdev;
use tiercache_bdevs::null::NullBdev;
use tiercache_bdevs::uring::UringBdev;
use tiercache_engine::bdev::{Bdev, BdevDesc, IoType};
use tiercache_engine::{Errno, IoBuf};

use common::{pattern, reactors, seed, TempFile};

fn error_bdev(tag: &str) -> (Arc<ErrorBdev>, BdevDesc) {
    let base = BdevDesc::new(MallocBdev::create(&format!("m_{tag}"), 2048, 4096).unwrap());
    let e = ErrorBdev::create(base, None).unwrap();
    let d = BdevDesc::new(e.clone());
    (e, d)
}

fn read_idx(t: IoType) -> usize {
    IoType::ALL.iter().position(|x| *x == t).unwrap()
}

#[test]
fn error_once_and_n_times_fail_exactly_that_many() {
    let set = reactors(1);
    let (e, d) = error_bdev("once");
    e.inject(ErrorSpec::new(Some(IoType::Read), ErrorKind::Failure, Trigger::Once)).unwrap();
    e.inject(ErrorSpec::new(Some(IoType::Write), ErrorKind::Failure, Trigger::Times(3))).unwrap();
    let e2 = e.clone();
    set.block_on(0, move || async move {
        let ch = d.channel().unwrap();
        let mut reads = Vec::new();
        for _ in 0..4 {
            reads.push(ch.read(0, IoBuf::new(4096)).await.status);
        }
        assert_eq!(reads, vec![Err(Errno::EIO), Ok(()), Ok(()), Ok(())]);
        let mut writes = Vec::new();
        for i in 0..5 {
            writes.push(ch.write(i * 4096, IoBuf::new(4096), false).await.status);
        }
        assert_eq!(writes, vec![Err(Errno::EIO), Err(Errno::EIO), Err(Errno::EIO), Ok(()), Ok(())]);
        assert!(ch.flush().await.status.is_ok(), "flush has no rule");
        let r = e2.rules();
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|(_, _, left)| *left == 0));
    })
    .unwrap();
    let s = e.stats();
    assert_eq!(s.failures, 4);
    assert_eq!(s.by_type[read_idx(IoType::Read)], 1);
    assert_eq!(s.by_type[read_idx(IoType::Write)], 3);
    set.stop();
}

#[test]
fn error_every_nth_counts_all_types_together_and_across_reactors() {
    let set = reactors(2);
    let (e, d) = error_bdev("nth");
    e.inject(ErrorSpec::new(None, ErrorKind::Failure, Trigger::EveryNth(4))).unwrap();
    let d1 = d.clone();
    let failed_at = set
        .block_on(0, move || async move {
            let ch = d1.channel().unwrap();
            let mut failed = Vec::new();
            for i in 0..20u64 {
                let st = match i % 4 {
                    0 => ch.read(0, IoBuf::new(4096)).await.status,
                    1 => ch.write(4096, IoBuf::new(4096), false).await.status,
                    2 => ch.unmap(8192, 4096).await.status,
                    _ => ch.flush().await.status,
                };
                if st.is_err() {
                    assert_eq!(st, Err(Errno::EIO));
                    failed.push(i + 1);
                }
            }
            failed
        })
        .unwrap();
    assert_eq!(failed_at, vec![4, 8, 12, 16, 20]);
    // Two reactors at once, 100 reads each: exactly 200 / 10 = 20 failures in total.
    e.clear();
    e.reset_stats();
    e.inject(ErrorSpec::new(Some(IoType::Read), ErrorKind::Failure, Trigger::EveryNth(10))).unwrap();
    let runs: Vec<_> = (0..2)
        .map(|r| {
            let d = d.clone();
            set.run_on(r, move || async move {
                let ch = d.channel().unwrap();
                let mut n = 0;
                for _ in 0..100 {
                    n += ch.read(0, IoBuf::new(4096)).await.status.is_err() as u64;
                }
                n
            })
        })
        .collect();
    let total: u64 = futures::executor::block_on(futures::future::join_all(runs)).into_iter().map(|r| r.unwrap()).sum();
    assert_eq!(total, 20);
    assert_eq!(e.stats().failures, 20);
    set.stop();
}

#[test]
fn error_probability_is_deterministic_per_reactor() {
    let s = seed("error_probability");
    let set = reactors(1);
    let (e, d) = error_bdev("prob");
    let p = 0.3;
    e.inject(ErrorSpec::new(Some(IoType::Read), ErrorKind::Failure, Trigger::Probability { p, seed: s })).unwrap();
    let got = set
        .block_on(0, move || async move {
            let ch = d.channel().unwrap();
            let mut v = Vec::new();
            for _ in 0..1000 {
                v.push(ch.read(0, IoBuf::new(4096)).await.status.is_err());
            }
            v
        })
        .unwrap();
    // The same decisions, computed from the documented seeding.
    let mut rng = ChaCha8Rng::seed_from_u64(channel_seed(s, 0));
    let want: Vec<bool> = (0..1000).map(|_| rng.gen::<f64>() < p).collect();
    assert_eq!(got, want);
    let n = want.iter().filter(|x| **x).count() as u64;
    println!("{n} of 1000 reads failed at p = {p}");
    assert!((200..400).contains(&n));
    assert_eq!(e.stats().failures, n);
    set.stop();
}

#[test]
fn error_nomem_is_retried_by_the_engine_until_it_succeeds() {
    let set = reactors(1);
    let (e, d) = error_bdev("nomem");
    e.inject(ErrorSpec::new(Some(IoType::Write), ErrorKind::NoMem, Trigger::Times(5))).unwrap();
    set.block_on(0, move || async move {
        let ch = d.channel().unwrap();
        let data = pattern(1, 0, 8192);
        let c = ch.write(8192, IoBuf::from_slice(&data), false).await;
        assert_eq!(c.status, Ok(()), "ENOMEM is backpressure, not a failure");
        assert_eq!(ch.stats().num_retries, 5);
        assert_eq!(ch.stats().num_errors, 0);
        let r = ch.read(8192, IoBuf::new(8192)).await;
        assert!(r.buf.unwrap()[..] == data[..]);
    })
    .unwrap();
    assert_eq!(e.stats().nomem, 5);
    set.stop();
}

#[test]
fn error_offline_is_sticky_enodev_until_clear() {
    let set = reactors(1);
    let (e, d) = error_bdev("offline");
    let e2 = e.clone();
    set.block_on(0, move || async move {
        let ch = d.channel().unwrap();
        ch.write(0, IoBuf::from_slice(&pattern(2, 0, 4096)), false).await.status.unwrap();
        e2.inject(ErrorSpec::new(Some(IoType::Read), ErrorKind::Failure, Trigger::Times(100))).unwrap();
        e2.set_offline(true);
        assert!(e2.is_offline());
        for _ in 0..3 {
            assert_eq!(ch.read(0, IoBuf::new(4096)).await.status, Err(Errno::ENODEV));
            assert_eq!(ch.write(0, IoBuf::new(4096), false).await.status, Err(Errno::ENODEV));
            assert_eq!(ch.flush().await.status, Err(Errno::ENODEV));
            assert_eq!(ch.unmap(0, 4096).await.status, Err(Errno::ENODEV));
            assert_eq!(ch.write_zeroes(0, 4096).await.status, Err(Errno::ENODEV));
        }
        assert_eq!(e2.stats().offline, 15);
        e2.clear();
        assert!(!e2.is_offline());
        assert!(e2.rules().is_empty());
        let r = ch.read(0, IoBuf::new(4096)).await;
        assert_eq!(r.status, Ok(()));
        assert!(r.buf.unwrap()[..] == pattern(2, 0, 4096)[..], "data survives going offline");
    })
    .unwrap();
    set.stop();
}

#[test]
fn error_corrupt_data_flips_reads_and_writes() {
    let set = reactors(1);
    let (e, d) = error_bdev("corrupt");
    let e2 = e.clone();
    set.block_on(0, move || async move {
        let ch = d.channel().unwrap();
        let data = pattern(3, 0, 8192);
        ch.write(0, IoBuf::from_slice(&data), false).await.status.unwrap();
        e2.inject(ErrorSpec::new(Some(IoType::Read), ErrorKind::CorruptData, Trigger::Once)).unwrap();
        let bad = ch.read(0, IoBuf::new(8192)).await;
        assert_eq!(bad.status, Ok(()), "corruption is silent");
        let bad = bad.buf.unwrap();
        assert_eq!(bad[0], data[0] ^ 0xFF);
        assert_eq!(bad[4096], data[4096] ^ 0xFF);
        assert!(bad[1..4096] == data[1..4096]);
        let good = ch.read(0, IoBuf::new(8192)).await.buf.unwrap();
        assert!(good[..] == data[..], "once means once");
        // Corrupted write: the caller's buffer comes back intact, the device holds flipped bytes.
        e2.inject(ErrorSpec::new(Some(IoType::Write), ErrorKind::CorruptData, Trigger::Once)).unwrap();
        let w = ch.write(0, IoBuf::from_slice(&data), false).await;
        assert_eq!(w.status, Ok(()));
        assert!(w.buf.unwrap()[..] == data[..]);
        let stored = ch.read(0, IoBuf::new(8192)).await.buf.unwrap();
        assert_eq!(stored[0], data[0] ^ 0xFF);
        assert!(stored[1..4096] == data[1..4096]);
    })
    .unwrap();
    assert_eq!(e.stats().corrupted, 2);
    set.stop();
}

#[test]
fn error_rejects_bad_rules_and_names() {
    let (e, _) = error_bdev("rules");
    assert_eq!(e.inject(ErrorSpec::new(None, ErrorKind::Failure, Trigger::Times(0))), Err(Errno::EINVAL));
    assert_eq!(e.inject(ErrorSpec::new(None, ErrorKind::Failure, Trigger::EveryNth(0))), Err(Errno::EINVAL));
    let bad_p = Trigger::Probability { p: 1.5, seed: 1 };
    assert_eq!(e.inject(ErrorSpec::new(None, ErrorKind::Failure, bad_p)), Err(Errno::EINVAL));
    let nan_p = Trigger::Probability { p: f64::NAN, seed: 1 };
    assert_eq!(e.inject(ErrorSpec::new(None, ErrorKind::Failure, nan_p)), Err(Errno::EINVAL));
    assert_eq!(
        e.inject(ErrorSpec::new(Some(IoType::Flush), ErrorKind::CorruptData, Trigger::Once)),
        Err(Errno::EINVAL)
    );
    let base = BdevDesc::new(NullBdev::create("n_rules", 8, 512).unwrap());
    assert!(ErrorBdev::create(base.clone(), Some("n_rules")).is_err());
    assert!(ErrorBdev::create(base.clone(), Some("")).is_err());
    assert_eq!(ErrorBdev::create(base, Some("custom")).unwrap().info().name, "custom");
}

#[test]
fn delay_holds_completions_on_timers_and_updates_at_run_time() {
    let set = reactors(1);
    let base = BdevDesc::new(MallocBdev::create("m_delay", 256, 4096).unwrap());
    let l = DelayLatencies { avg_read_us: 2000, p99_read_us: 2000, avg_write_us: 0, p99_write_us: 0 };
    let dl = DelayBdev::create(base, "delay_t", l, 11).unwrap();
    let d = BdevDesc::new(dl.clone());
    set.block_on(0, move || async move {
        let ch = d.channel().unwrap();
        // Reads: ~2 ms each (every draw is within [1 ms, 2.4 ms] with avg = p99 = 2 ms).
        let mut lat = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            ch.read(0, IoBuf::new(4096)).await.status.unwrap();
            lat.push(t.elapsed());
        }
        let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
        println!("read latency with avg = p99 = 2 ms: mean {mean:?}, min {:?}", lat.iter().min().unwrap());
        assert!(*lat.iter().min().unwrap() >= Duration::from_millis(1));
        // The lower bound is the bdev's; the upper one only catches gross errors (timers
        // overshoot on a loaded machine).
        assert!(mean >= Duration::from_micros(1800) && mean < Duration::from_millis(100), "{mean:?}");
        // Writes: no latency configured.
        let t = Instant::now();
        for _ in 0..20 {
            ch.write(0, IoBuf::new(4096), false).await.status.unwrap();
        }
        assert!(t.elapsed() < Duration::from_millis(200), "{:?}", t.elapsed());
        // Update at run time: reads become fast, writes slow.
        dl.update_latency(LatencyKind::AvgRead, 0).unwrap();
        dl.update_latency(LatencyKind::P99Read, 0).unwrap();
        dl.update_latency(LatencyKind::AvgWrite, 3000).unwrap();
        dl.update_latency(LatencyKind::P99Write, 3000).unwrap();
        let t = Instant::now();
        for _ in 0..20 {
            ch.read(0, IoBuf::new(4096)).await.status.unwrap();
        }
        assert!(t.elapsed() < Duration::from_millis(200), "{:?}", t.elapsed());
        let t = Instant::now();
        ch.flush().await.status.unwrap();
        assert!(t.elapsed() >= Duration::from_micros(1500), "flush uses the write latency");
        assert_eq!(dl.update_latency(LatencyKind::AvgRead, u64::MAX), Err(Errno::EINVAL));
    })
    .unwrap();
    set.stop();
}

#[test]
fn uring_file_not_a_block_multiple_keeps_its_tail() {
    let set = reactors(1);
    let f = TempFile::new(&std::env::temp_dir().to_string_lossy(), "odd_tail", 5 * 4096 + 777);
    let tail = pattern(9, 5 * 4096, 777);
    std::fs::write(&f.0, [vec![0u8; 5 * 4096], tail.clone()].concat()).unwrap();
    let b = UringBdev::create("uring_odd", &f.0, Some(4096)).unwrap();
    assert_eq!(b.info().num_blocks, 5);
    let d = BdevDesc::new(b);
    set.block_on(0, move || async move {
        let ch = d.channel().unwrap();
        ch.write(4 * 4096, IoBuf::from_slice(&[0xAB; 4096]), true).await.status.unwrap();
        ch.write_zeroes(0, 5 * 4096).await.status.unwrap();
        ch.unmap(4096, 4096).await.status.unwrap();
        assert_eq!(ch.read(5 * 4096, IoBuf::new(4096)).await.status, Err(Errno::EINVAL));
        ch.flush().await.status.unwrap();
        d.close_channel();
    })
    .unwrap();
    let bytes = std::fs::read(&f.0).unwrap();
    assert_eq!(bytes.len(), 5 * 4096 + 777, "the file keeps its size");
    assert!(bytes[5 * 4096..] == tail[..], "bytes past the last whole block are never touched");
    assert!(bytes[..5 * 4096].iter().all(|&x| x == 0));
    set.stop();
}

#[test]
fn uring_fd_stays_open_while_the_bdev_or_a_channel_lives() {
    let set = reactors(1);
    let f = TempFile::new(&std::env::temp_dir().to_string_lossy(), "fd_life", 1 << 20);
    let d = BdevDesc::new(UringBdev::create("uring_fd", &f.0, None).unwrap());
    let d2 = d.clone();
    set.block_on(0, move || async move {
        let ch = d2.channel().unwrap();
        // Start I/Os, drop some of them mid-flight, close the channel and drop the bdev's
        // last handle: nothing may break (the kernel or the deferred release keeps the fd).
        let data = pattern(4, 0, 65536);
        let mut ios: Vec<_> = (0..16).map(|i| ch.write(i * 65536, IoBuf::from_slice(&data), false)).collect();
        let kept = ios.split_off(8);
        drop(ios);
        for c in futures::future::join_all(kept).await {
            c.status.unwrap();
        }
        d2.close_channel();
    })
    .unwrap();
    drop(d);
    set.stop();
}

#[test]
fn modules_describe_themselves_and_their_config_call() {
    let m = MallocBdev::create("cfg_m", 128, 512).unwrap();
    let (method, p) = m.config_call().unwrap();
    assert_eq!(method, "bdev_malloc_create");
    assert_eq!(
        (p["name"].as_str(), p["num_blocks"].as_u64(), p["block_size"].as_u64()),
        (Some("cfg_m"), Some(128), Some(512))
    );
    assert_eq!(p["uuid"].as_str().unwrap(), m.info().uuid.to_string());
    assert_eq!(m.driver(), "malloc");
    assert!(!m.info().volatile_cache);
    assert!(m.driver_specific()["malloc"]["allocated_bytes"].is_u64());

    let n = NullBdev::create("cfg_n", 16, 4096).unwrap();
    assert_eq!(n.config_call().unwrap().0, "bdev_null_create");
    assert_eq!(n.driver(), "null");

    let f = TempFile::new(&std::env::temp_dir().to_string_lossy(), "cfg_u", 1 << 20);
    let u = UringBdev::create("cfg_u", &f.0, None).unwrap();
    let (method, p) = u.config_call().unwrap();
    assert_eq!(method, "bdev_uring_create");
    assert_eq!(p["filename"].as_str().unwrap(), f.0.to_string_lossy());
    assert_eq!(p["block_size"].as_u64(), Some(u.info().block_size as u64));
    assert_eq!(u.driver_specific()["uring"]["direct_io"].as_bool(), Some(u.is_direct()));

    let e = ErrorBdev::create(BdevDesc::new(m.clone()), None).unwrap();
    let (method, p) = e.config_call().unwrap();
    assert_eq!(method, "bdev_error_create");
    assert_eq!(p["base_name"].as_str(), Some("cfg_m"));
    assert!(p.get("name").is_none(), "default EE_ name is implied");
    assert_eq!(e.base_bdevs(), vec!["cfg_m".to_string()]);
    assert_eq!(e.info().size_bytes(), m.info().size_bytes());

    let l = DelayLatencies { avg_read_us: 10, p99_read_us: 20, avg_write_us: 30, p99_write_us: 40 };
    let dl = DelayBdev::create(BdevDesc::new(m), "cfg_d", l, 5).unwrap();
    let (method, p) = dl.config_call().unwrap();
    assert_eq!(method, "bdev_delay_create");
    assert_eq!(
        (
            p["avg_read_latency"].as_u64(),
            p["p99_read_latency"].as_u64(),
            p["avg_write_latency"].as_u64(),
            p["p99_write_latency"].as_u64()
        ),
        (Some(10), Some(20), Some(30), Some(40))
    );
    assert_eq!(p["base_bdev_name"].as_str(), Some("cfg_m"));
}

#[test]
fn constructors_reject_bad_geometry() {
    assert_eq!(MallocBdev::create("g", 0, 512).err(), Some(Errno::EINVAL));
    assert_eq!(MallocBdev::create("g", 8, 1024).err(), Some(Errno::EINVAL));
    assert_eq!(MallocBdev::create("g", u64::MAX, 4096).err(), Some(Errno::EINVAL));
    assert_eq!(MallocBdev::create("", 8, 512).err(), Some(Errno::EINVAL));
    assert_eq!(NullBdev::create("g g", 8, 512).err(), Some(Errno::EINVAL));
    assert_eq!(NullBdev::create("g", 8, 0).err(), Some(Errno::EINVAL));
}
