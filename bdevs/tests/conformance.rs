//! The conformance suite (SPDK's bdevio idea): the same checks against every backend, with
//! 512- and 4096-byte blocks, always through `BdevDesc::channel()` → `IoChannel`.
//!
//! Backends: malloc; uring on a file in the temp dir (O_DIRECT); uring on tmpfs /dev/shm
//! (O_DIRECT is accepted by tmpfs on kernels ≥ 6.6, else the buffered fallback — the mode is
//! printed); uring forced buffered; null (data checks skipped: it stores nothing and reads
//! leave the buffer untouched — everything else is checked); error over malloc with nothing
//! injected; delay over malloc with small latencies.
//!
//! Checks: write/read-back patterns at several offsets and sizes (stripe-crossing, last
//! blocks), FUA write, flush, unmap then read (zeros), write-zeroes (zeros, neighbours
//! intact), out of range (EINVAL for reads, ENOSPC for writes), misaligned offset/length,
//! zero length, buffer/length mismatch (EINVAL), unsupported type (ENOTSUP), 128 I/Os in
//! flight on one reactor, and on two reactors at once (disjoint ranges, verified). The raw
//! backend channels are also fed invalid requests directly (no validation in front): EINVAL,
//! never a panic.

mod common;

use std::any::Any;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tiercache_bdevs::delay::{DelayBdev, DelayLatencies};
use tiercache_bdevs::error::ErrorBdev;
use tiercache_bdevs::malloc::MallocBdev;
use tiercache_bdevs::null::NullBdev;
use tiercache_bdevs::uring::{DirectIo, UringBdev, UringOptions};
use tiercache_engine::bdev::{Bdev, BdevChannel, BdevDesc, BdevInfo, IoFuture, IoRequest, IoType};
use tiercache_engine::{Errno, IoBuf};

use common::{pattern, reactors, seed, TempFile};

const SIZE: u64 = 8 << 20;

/// A backend under test: its descriptor and whatever must outlive it.
struct Target {
    desc: BdevDesc,
    /// Whether reads return what was written (false for null).
    stores_data: bool,
    _keep: Vec<Box<dyn Any + Send>>,
}

fn malloc(bs: u32, tag: &str) -> Target {
    let b = MallocBdev::create(&format!("malloc_{tag}"), SIZE / bs as u64, bs).unwrap();
    Target { desc: BdevDesc::new(b), stores_data: true, _keep: vec![] }
}

fn uring(dir: &str, opts: UringOptions, bs: u32, tag: &str, expect_direct: Option<bool>) -> Target {
    let f = TempFile::new(dir, tag, SIZE);
    let b =
        UringBdev::create_with(&format!("uring_{tag}"), &f.0, UringOptions { block_size: Some(bs), ..opts }).unwrap();
    println!("{tag}: {} with O_DIRECT={} block size {}", f.0.display(), b.is_direct(), b.info().block_size);
    if let Some(d) = expect_direct {
        assert_eq!(b.is_direct(), d, "{tag}: direct I/O mode");
    }
    assert!(b.info().volatile_cache);
    Target { desc: BdevDesc::new(b), stores_data: true, _keep: vec![Box::new(f)] }
}

fn null(bs: u32, tag: &str) -> Target {
    let b = NullBdev::create(&format!("null_{tag}"), SIZE / bs as u64, bs).unwrap();
    Target { desc: BdevDesc::new(b), stores_data: false, _keep: vec![] }
}

fn error_over_malloc(bs: u32, tag: &str) -> Target {
    let base = malloc(bs, tag);
    let e = ErrorBdev::create(base.desc.clone(), None).unwrap();
    assert_eq!(e.info().name, format!("EE_malloc_{tag}"));
    Target { desc: BdevDesc::new(e), stores_data: true, _keep: vec![Box::new(base.desc)] }
}

fn delay_over_malloc(bs: u32, tag: &str) -> Target {
    let base = malloc(bs, tag);
    let l = DelayLatencies { avg_read_us: 20, p99_read_us: 100, avg_write_us: 30, p99_write_us: 150 };
    let d = DelayBdev::create(base.desc.clone(), &format!("delay_{tag}"), l, 42).unwrap();
    Target { desc: BdevDesc::new(d), stores_data: true, _keep: vec![Box::new(base.desc)] }
}

/// Run the whole suite for one backend at both block sizes.
fn conformance(backend: &str, make: impl Fn(u32, &str) -> Target) {
    let s = seed(backend);
    let set = reactors(2);
    for bs in [512u32, 4096] {
        let tag = format!("{backend}_{bs}");
        println!("== {tag}");
        let t = make(bs, &tag);
        let info = t.desc.bdev().info().clone();
        assert_eq!(info.block_size, bs);
        assert_eq!(info.size_bytes(), SIZE);
        let (desc, data) = (t.desc.clone(), t.stores_data);
        set.block_on(0, move || async move { single_reactor_checks(desc, data, s).await }).unwrap();
        // Two reactors at once, disjoint halves, 128 in flight each.
        let runs: Vec<_> = (0..2)
            .map(|r| {
                let d = t.desc.clone();
                let data = t.stores_data;
                set.run_on(r, move || async move {
                    in_flight(d, r as u64 * SIZE / 2, SIZE / 2, 128, s ^ r as u64, data).await
                })
            })
            .collect();
        for r in futures::executor::block_on(join_all(runs)) {
            r.unwrap();
        }
        let d = t.desc.clone();
        set.block_on(1, move || async move { raw_channel_rejects_bad_requests(d.bdev().as_ref()).await }).unwrap();
        let (d0, d1) = (t.desc.clone(), t.desc.clone());
        set.block_on(0, move || async move { d0.close_channel() }).unwrap();
        set.block_on(1, move || async move { d1.close_channel() }).unwrap();
    }
    set.stop();
}

async fn expect_ok(what: &str, c: tiercache_engine::bdev::IoCompletion) -> Option<IoBuf> {
    if let Err(e) = c.status {
        panic!("{what}: {e}");
    }
    c.buf
}

async fn write_read(
    ch: &std::rc::Rc<tiercache_engine::bdev::IoChannel>,
    off: u64,
    len: usize,
    seed: u64,
    data: bool,
    fua: bool,
) {
    let want = pattern(seed, off, len);
    let w = ch.write(off, IoBuf::from_slice(&want), fua).await;
    let back = expect_ok(&format!("write {off}+{len}"), w).await.expect("write buffer comes back");
    assert_eq!(&back[..], &want[..], "the write buffer comes back unchanged");
    let r = expect_ok(&format!("read {off}+{len}"), ch.read(off, IoBuf::zeroed(len)).await).await.expect("read buffer");
    assert_eq!(r.len(), len);
    if data {
        assert!(r[..] == want[..], "read-back mismatch at {off}+{len}");
    }
}

async fn single_reactor_checks(desc: BdevDesc, data: bool, seed: u64) {
    let ch = desc.channel().unwrap();
    let info = ch.info().clone();
    let bs = info.block_size as u64;
    let size = info.size_bytes();

    // Patterns at several offsets and sizes.
    let offsets = [0, bs, 7 * bs, (1 << 20) - bs, (1 << 20) - 4096, 3 << 20, size - 8 * bs - (1 << 20)];
    let sizes = [bs, 2 * bs, 8192, 3 * 4096, 128 << 10, (1 << 20) + 4096];
    for (i, &off) in offsets.iter().enumerate() {
        for (j, &len) in sizes.iter().enumerate() {
            write_read(&ch, off, len as usize, seed ^ ((i * 16 + j) as u64), data, false).await;
        }
    }
    // The last block, then the last 8 blocks.
    write_read(&ch, size - bs, bs as usize, seed ^ 0x100, data, false).await;
    write_read(&ch, size - 8 * bs, 8 * bs as usize, seed ^ 0x101, data, false).await;

    // FUA write and flush.
    write_read(&ch, 5 * 4096, 4096, seed ^ 0x200, data, true).await;
    expect_ok("flush", ch.flush().await).await;

    // Unmap then read: zeros; neighbours intact.
    let base = 2 << 20;
    write_read(&ch, base, 64 << 10, seed ^ 0x300, data, false).await;
    expect_ok("unmap", ch.unmap(base + 16384, 16384).await).await;
    let r = expect_ok("read after unmap", ch.read(base, IoBuf::new(64 << 10)).await).await.unwrap();
    if data {
        let want = pattern(seed ^ 0x300, base, 64 << 10);
        assert!(r[..16384] == want[..16384], "before the unmapped range");
        assert!(r[16384..32768].iter().all(|&b| b == 0), "unmapped range reads zeros");
        assert!(r[32768..] == want[32768..], "after the unmapped range");
    }
    // Unmap of a whole 1 MiB-aligned region (malloc frees the stripe) reads zeros too.
    write_read(&ch, 4 << 20, 1 << 20, seed ^ 0x301, data, false).await;
    expect_ok("unmap 1 MiB", ch.unmap(4 << 20, 1 << 20).await).await;
    let r = expect_ok("read", ch.read(4 << 20, IoBuf::new(1 << 20)).await).await.unwrap();
    if data {
        assert!(r.iter().all(|&b| b == 0));
    }

    // Write-zeroes: zeros, neighbours intact; a large one (chunked by the uring fallback).
    write_read(&ch, base, 64 << 10, seed ^ 0x400, data, false).await;
    expect_ok("write_zeroes", ch.write_zeroes(base + bs, 3 * bs).await).await;
    let r = expect_ok("read after write_zeroes", ch.read(base, IoBuf::new(64 << 10)).await).await.unwrap();
    if data {
        let want = pattern(seed ^ 0x400, base, 64 << 10);
        let (a, b) = (bs as usize, 4 * bs as usize);
        assert!(r[..a] == want[..a]);
        assert!(r[a..b].iter().all(|&x| x == 0), "write-zeroes range reads zeros");
        assert!(r[b..] == want[b..]);
    }
    write_read(&ch, 5 << 20, (2 << 20) + 8192, seed ^ 0x401, data, false).await;
    expect_ok("write_zeroes 2 MiB", ch.write_zeroes(5 << 20, (2 << 20) + 8192).await).await;
    let r = expect_ok("read", ch.read(5 << 20, IoBuf::new((2 << 20) + 8192)).await).await.unwrap();
    if data {
        assert!(r.iter().all(|&b| b == 0));
    }

    // Out of range.
    assert_eq!(ch.read(size, IoBuf::new(bs as usize)).await.status, Err(Errno::EINVAL));
    assert_eq!(ch.read(size - bs, IoBuf::new(2 * bs as usize)).await.status, Err(Errno::EINVAL));
    assert_eq!(ch.write(size - bs, IoBuf::new(2 * bs as usize), false).await.status, Err(Errno::ENOSPC));
    assert_eq!(ch.unmap(size - bs, 2 * bs).await.status, Err(Errno::ENOSPC));
    assert_eq!(ch.write_zeroes(size, bs).await.status, Err(Errno::ENOSPC));
    assert!(ch.read(u64::MAX - bs + 1, IoBuf::new(bs as usize)).await.status.is_err());
    // Misaligned offset or length.
    assert_eq!(ch.read(1, IoBuf::new(bs as usize)).await.status, Err(Errno::EINVAL));
    assert_eq!(ch.write(bs / 2, IoBuf::new(bs as usize), false).await.status, Err(Errno::EINVAL));
    assert_eq!(ch.read(0, IoBuf::new(bs as usize + 1)).await.status, Err(Errno::EINVAL));
    assert_eq!(ch.unmap(0, bs + 512 * (bs == 4096) as u64 + 1).await.status, Err(Errno::EINVAL));
    assert_eq!(ch.write_zeroes(bs - 1, bs).await.status, Err(Errno::EINVAL));
    // Zero length.
    assert_eq!(ch.read(0, IoBuf::new(0)).await.status, Err(Errno::EINVAL));
    assert_eq!(ch.write(0, IoBuf::new(0), false).await.status, Err(Errno::EINVAL));
    assert_eq!(ch.unmap(0, 0).await.status, Err(Errno::EINVAL));
    assert_eq!(ch.write_zeroes(0, 0).await.status, Err(Errno::EINVAL));
    // Buffer/length mismatch, missing buffer: EINVAL, and the buffer comes back.
    let c = ch
        .submit(IoRequest {
            io_type: IoType::Read,
            offset: 0,
            len: 2 * bs,
            buf: Some(IoBuf::new(bs as usize)),
            fua: false,
        })
        .await;
    assert_eq!(c.status, Err(Errno::EINVAL));
    assert_eq!(c.buf.map(|b| b.len()), Some(bs as usize));
    let c = ch.submit(IoRequest { io_type: IoType::Write, offset: 0, len: bs, buf: None, fua: false }).await;
    assert_eq!(c.status, Err(Errno::EINVAL));
    // Above the per-I/O bound.
    let big = info.max_io_bytes + bs;
    assert_eq!(ch.read(0, IoBuf::new(big as usize)).await.status, Err(Errno::EINVAL));

    // Unsupported type: the same backend behind a view that does not offer unmap.
    let restricted = BdevDesc::new(Arc::new(NoUnmap::new(desc.bdev().clone())));
    let rc = restricted.channel().unwrap();
    assert_eq!(rc.unmap(0, bs).await.status, Err(Errno::ENOTSUP));
    expect_ok("read through the restricted view", rc.read(0, IoBuf::new(bs as usize)).await).await;
    restricted.close_channel();

    // Every rejection was counted, and nothing errored at the backend.
    let st = ch.stats();
    assert!(st.num_rejected >= 18, "{st:?}");
    assert_eq!(st.num_errors, 0, "{st:?}");

    // 128 I/Os in flight on this reactor.
    in_flight(desc.clone(), 0, size, 128, seed ^ 0x500, data).await;
}

/// `n` writes in flight at once over [start, start+len), then `n` reads in flight, verified.
/// Returns the time spent waiting for the I/Os (buffer preparation and checks excluded).
async fn in_flight(desc: BdevDesc, start: u64, len: u64, n: u64, seed: u64, data: bool) -> Duration {
    let ch = desc.channel().unwrap();
    let bs = ch.info().block_size as u64;
    let io_len = (len / n / bs).clamp(1, 16) * bs;
    let stride = len / n / bs * bs;
    assert!(stride >= io_len);
    let bufs: Vec<_> = (0..n).map(|i| IoBuf::from_slice(&pattern(seed, start + i * stride, io_len as usize))).collect();
    let t0 = std::time::Instant::now();
    let writes: Vec<_> =
        bufs.into_iter().enumerate().map(|(i, b)| ch.write(start + i as u64 * stride, b, i % 7 == 0)).collect();
    let done = join_all(writes).await;
    let mut waited = t0.elapsed();
    for (i, c) in done.into_iter().enumerate() {
        assert!(c.status.is_ok(), "write {i}: {:?}", c.status);
    }
    let t0 = std::time::Instant::now();
    let reads: Vec<_> = (0..n).map(|i| ch.read(start + i * stride, IoBuf::new(io_len as usize))).collect();
    let done = join_all(reads).await;
    waited += t0.elapsed();
    for (i, c) in done.into_iter().enumerate() {
        assert!(c.status.is_ok(), "read {i}: {:?}", c.status);
        let off = start + i as u64 * stride;
        if data {
            assert!(
                c.buf.unwrap()[..] == pattern(seed, off, io_len as usize)[..],
                "in-flight read-back mismatch at {off}"
            );
        }
    }
    waited
}

/// Requests that skip the engine's validation still complete with an errno (the backend
/// channel re-checks): no panic, the buffer comes back.
async fn raw_channel_rejects_bad_requests(bdev: &dyn Bdev) {
    let ch = bdev.create_channel().unwrap();
    let info = bdev.info();
    let bs = info.block_size as u64;
    let size = info.size_bytes();
    let bad = vec![
        IoRequest { io_type: IoType::Read, offset: size, len: bs, buf: Some(IoBuf::new(bs as usize)), fua: false },
        IoRequest {
            io_type: IoType::Write,
            offset: u64::MAX - bs + 1,
            len: bs,
            buf: Some(IoBuf::new(bs as usize)),
            fua: false,
        },
        IoRequest { io_type: IoType::Read, offset: 1, len: bs, buf: Some(IoBuf::new(bs as usize)), fua: false },
        IoRequest { io_type: IoType::Read, offset: 0, len: 2 * bs, buf: Some(IoBuf::new(bs as usize)), fua: false },
        IoRequest { io_type: IoType::Write, offset: 0, len: bs, buf: None, fua: false },
        IoRequest { io_type: IoType::Read, offset: 0, len: 0, buf: Some(IoBuf::new(0)), fua: false },
        IoRequest { io_type: IoType::Unmap, offset: size - bs, len: 2 * bs, buf: None, fua: false },
        IoRequest { io_type: IoType::WriteZeroes, offset: 0, len: u64::MAX, buf: None, fua: false },
        IoRequest { io_type: IoType::Unmap, offset: bs, len: 3, buf: None, fua: false },
    ];
    for (i, req) in bad.into_iter().enumerate() {
        let had_buf = req.buf.is_some();
        let c = ch.submit(req).await;
        assert_eq!(c.status, Err(Errno::EINVAL), "raw request {i} on {}", info.name);
        assert_eq!(c.buf.is_some(), had_buf, "raw request {i}: buffer comes back");
    }
}

/// A view of a bdev without unmap (to check ENOTSUP end to end).
struct NoUnmap {
    inner: Arc<dyn Bdev>,
    info: BdevInfo,
}

impl NoUnmap {
    fn new(inner: Arc<dyn Bdev>) -> NoUnmap {
        let mut info = inner.info().clone();
        info.name = format!("{}_nounmap", info.name);
        info.io_types = info.io_types.without(IoType::Unmap);
        NoUnmap { inner, info }
    }
}

impl Bdev for NoUnmap {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        self.inner.create_channel()
    }
    fn driver(&self) -> &'static str {
        "test_nounmap"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// Keep IoFuture in scope for readers of this file: every backend returns one.
#[allow(dead_code)]
fn _returns_io_future(c: &dyn BdevChannel, r: IoRequest) -> IoFuture {
    c.submit(r)
}

#[test]
fn malloc_conforms() {
    conformance("malloc", malloc);
}

#[test]
fn uring_direct_file_conforms() {
    let tmp = std::env::temp_dir();
    let dir = tmp.to_str().unwrap().to_string();
    conformance("uring_direct", |bs, tag| uring(&dir, UringOptions::default(), bs, tag, Some(true)));
}

#[test]
fn uring_tmpfs_conforms() {
    if !Path::new("/dev/shm").is_dir() {
        println!("no /dev/shm: skipped");
        return;
    }
    conformance("uring_shm", |bs, tag| uring("/dev/shm", UringOptions::default(), bs, tag, None));
}

#[test]
fn uring_buffered_conforms() {
    let tmp = std::env::temp_dir();
    let dir = tmp.to_str().unwrap().to_string();
    conformance("uring_buffered", |bs, tag| {
        uring(&dir, UringOptions { direct: DirectIo::Off, ..UringOptions::default() }, bs, tag, Some(false))
    });
}

#[test]
fn null_conforms() {
    conformance("null", null);
}

#[test]
fn error_over_malloc_conforms() {
    conformance("error", error_over_malloc);
}

#[test]
fn delay_over_malloc_conforms() {
    conformance("delay", delay_over_malloc);
}

#[test]
fn suite_does_not_hang_on_slow_delay() {
    // A delay bdev with latencies of a few ms still completes the in-flight checks quickly:
    // timers do not serialise I/Os.
    let set = reactors(1);
    let base = malloc(4096, "slowbase");
    let l = DelayLatencies { avg_read_us: 5000, p99_read_us: 8000, avg_write_us: 5000, p99_write_us: 8000 };
    let d = BdevDesc::new(DelayBdev::create(base.desc.clone(), "slowdelay", l, 9).unwrap());
    let io_time = set.block_on(0, move || async move { in_flight(d, 0, SIZE, 128, 5, true).await }).unwrap();
    let el = io_time;
    println!("128 writes + 128 reads in flight at ~5 ms each: {el:?}");
    assert!(el >= Duration::from_millis(10));
    // Serialised, they would take 256 × ~5 ms ≈ 1.3 s.
    assert!(el < Duration::from_millis(700), "I/Os were serialised: {el:?}");
    set.stop();
}
