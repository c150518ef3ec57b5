//! The server against a hostile or abrupt raw TCP client, and the shutdown
//! paths (remove_export / stop) with requests in flight.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tiercache_bdevs::delay::{DelayBdev, DelayLatencies};
use tiercache_bdevs::malloc::MallocBdev;
use tiercache_engine::bdev::BdevDesc;

use support::*;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ESHUTDOWN: u32 = 108;

/// A client that still works: write, read back, disconnect.
fn still_works(rig: &Rig, export: &str) {
    let mut c = RawClient::connect(rig.port(), export).expect("connect");
    let data = vec![0x5a; 4096];
    assert_eq!(c.write(1, 8192, &data, 0).expect("write"), 0);
    let (err, got) = c.read(2, 8192, 4096).expect("read");
    assert_eq!(err, 0);
    assert_eq!(got, data);
    c.disconnect();
}

/// Read until EOF (or a 10 s timeout, which fails).
fn expect_eof(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected the server to close the connection, got {e}"),
        }
    }
}

#[test]
fn invalid_requests_get_errors_and_the_connection_goes_on() {
    let rig = Rig::new();
    rig.add_malloc("m", 8, 512, false);
    rig.add_malloc("ro", 8, 4096, true);
    let mut c = RawClient::connect(rig.port(), "m").expect("connect");
    assert_eq!(c.size, 8 << 20);
    // Out of range read, write past the end, misaligned, oversized, zero length.
    assert_eq!(c.read(1, 8 << 20, 512).expect("read").0, EINVAL);
    assert_eq!(c.write(2, (8 << 20) - 512, &[1; 1024], 0).expect("write"), ENOSPC);
    assert_eq!(c.read(3, 100, 512).expect("read").0, EINVAL);
    assert_eq!(c.write(4, 0, &[1; 700], 0).expect("write"), EINVAL);
    assert_eq!(c.read(5, 0, 64 << 20).expect("read").0, EINVAL);
    assert_eq!(c.read(6, 0, 0).expect("read").0, EINVAL);
    // Oversized write: rejected, its 40 MiB payload skipped, stream in sync.
    let big = vec![0x25u8; 40 << 20];
    assert_eq!(c.write(7, 0, &big, 0).expect("write"), EINVAL);
    // Unknown command and unknown flags.
    c.send(&header(0, 42, 8, 0, 512)).expect("send");
    assert_eq!(c.reply().expect("reply"), (EINVAL, 8));
    c.send(&header(0x8000, 0, 9, 0, 512)).expect("send");
    assert_eq!(c.reply().expect("reply"), (EINVAL, 9));
    // Still fine.
    assert_eq!(c.write(10, 4096, &[7; 4096], 1).expect("fua write"), 0);
    assert_eq!(c.read(11, 4096, 4096).expect("read"), (0, vec![7; 4096]));
    c.send(&header(0, 3, 12, 0, 0)).expect("flush");
    assert_eq!(c.reply().expect("reply"), (0, 12));
    c.send(&header(0, 4, 13, 0, 4096)).expect("trim");
    assert_eq!(c.reply().expect("reply"), (0, 13));
    c.send(&header(0, 5, 14, 0, 1 << 20)).expect("cache");
    assert_eq!(c.reply().expect("reply"), (0, 14));
    c.disconnect();

    let mut r = RawClient::connect(rig.port(), "ro").expect("connect ro");
    assert_eq!(r.flags & 2, 2, "READ_ONLY advertised");
    assert_eq!(r.write(1, 0, &[1; 4096], 0).expect("write"), EPERM);
    r.send(&header(0, 6, 2, 0, 4096)).expect("write zeroes");
    assert_eq!(r.reply().expect("reply"), (EPERM, 2));
    assert_eq!(r.read(3, 0, 4096).expect("read").0, 0);
    r.disconnect();
    still_works(&rig, "m");
}

#[test]
fn protocol_violations_and_garbage_end_only_that_connection() {
    let rig = Rig::new();
    rig.add_malloc("m", 8, 512, false);
    // Garbage instead of client flags.
    let mut s = TcpStream::connect(("127.0.0.1", rig.port())).expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    expect_eof(&mut s);
    // Bad option magic.
    let mut s = TcpStream::connect(("127.0.0.1", rig.port())).expect("connect");
    s.write_all(&1u32.to_be_bytes()).expect("flags");
    s.write_all(b"NOTOPT!!\0\0\0\x07\0\0\0\0").expect("opt");
    expect_eof(&mut s);
    // Unknown export via EXPORT_NAME.
    let mut s = TcpStream::connect(("127.0.0.1", rig.port())).expect("connect");
    s.write_all(&1u32.to_be_bytes()).expect("flags");
    s.write_all(b"IHAVEOPT\0\0\0\x01\0\0\0\x04nope").expect("opt");
    expect_eof(&mut s);
    // Bad request magic in transmission, with requests in flight before it.
    let mut c = RawClient::connect(rig.port(), "m").expect("connect");
    let mut burst = Vec::new();
    for i in 0..16u64 {
        burst.extend(header(0, 0, i, i * 4096, 4096));
    }
    burst.extend_from_slice(&[0xde; 28]);
    c.send(&burst).expect("send");
    for _ in 0..16 {
        let (err, _) = c.reply().expect("reply to the requests before the violation");
        assert_eq!(err, 0);
        let mut data = vec![0; 4096];
        c.s.read_exact(&mut data).expect("data");
    }
    expect_eof(&mut c.s);
    // Client vanishing in the middle of a write payload and mid-handshake.
    let mut c = RawClient::connect(rig.port(), "m").expect("connect");
    let mut m = header(0, 1, 1, 0, 1 << 20);
    m.extend(vec![1u8; 100_000]);
    c.send(&m).expect("send");
    drop(c);
    let mut s = TcpStream::connect(("127.0.0.1", rig.port())).expect("connect");
    s.write_all(&[0, 0]).expect("half the flags");
    drop(s);
    // Seeded random bytes after a valid handshake.
    let seed = seed();
    eprintln!("garbage seed {seed:#x}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..20 {
        let mut c = RawClient::connect(rig.port(), "m").expect("connect");
        let len = rng.gen_range(1..4096);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if rng.gen_bool(0.5) {
            // Often start with a valid magic so validation paths are hit.
            junk.splice(0..0, header(rng.gen(), rng.gen_range(0..10), 1, rng.gen(), rng.gen()));
        }
        let _ = c.send(&junk);
        c.s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let mut sink = [0u8; 8192];
        while let Ok(n) = c.s.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    }
    still_works(&rig, "m");
    assert_eq!(rig.server.exports()[0].name, "m");
}

#[test]
fn many_pipelined_requests_and_concurrent_clients() {
    let rig = Rig::new();
    rig.add_malloc("m", 64, 4096, false);
    let port = rig.port();
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = RawClient::connect(port, "m").expect("connect");
                let base = t * (8 << 20);
                // 600 writes of 16 KiB pipelined (beyond the 128 in-flight bound),
                // then read everything back.
                let mut burst = Vec::new();
                for i in 0..600u64 {
                    burst.extend(header(0, 1, i, base + (i % 512) * 16384, 16384));
                    burst.extend(std::iter::repeat_n((i % 251) as u8, 16384));
                }
                let mut w = c.s.try_clone().expect("clone");
                let sender = std::thread::spawn(move || w.write_all(&burst).expect("send burst"));
                let mut seen = vec![false; 600];
                for _ in 0..600 {
                    let (err, cookie) = c.reply().expect("reply");
                    assert_eq!(err, 0);
                    assert!(!std::mem::replace(&mut seen[cookie as usize], true), "duplicate reply {cookie}");
                }
                sender.join().expect("sender");
                for i in 88..600u64 {
                    let (err, data) = c.read(10_000 + i, base + (i % 512) * 16384, 16384).expect("read");
                    assert_eq!(err, 0);
                    assert!(data.iter().all(|&b| b == (i % 251) as u8), "client {t} block {i}");
                }
                c.disconnect();
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while rig.server.exports()[0].connections > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(rig.server.exports()[0].connections, 0, "connections unregistered after disconnect");
}

/// An export whose I/O takes ~20 ms, so requests are really in flight.
fn add_slow(rig: &Rig, name: &str) {
    let base = MallocBdev::create(&format!("slowbase_{name}"), 4096, 4096).expect("malloc");
    let lat = DelayLatencies { avg_read_us: 20_000, p99_read_us: 30_000, avg_write_us: 20_000, p99_write_us: 30_000 };
    let d = DelayBdev::create(BdevDesc::new(base), &format!("slow_{name}"), lat, 7).expect("delay");
    rig.server.add_export(name, BdevDesc::new(d), false, None).expect("add_export");
}

/// Pipeline `n` writes, return the client after they are sent.
fn pipeline_writes(port: u16, export: &str, n: u64) -> RawClient {
    let mut c = RawClient::connect(port, export).expect("connect");
    let mut burst = Vec::new();
    for i in 0..n {
        burst.extend(header(0, 1, i, (i % 1024) * 4096, 4096));
        burst.extend(std::iter::repeat_n(i as u8, 4096));
    }
    c.send(&burst).expect("send");
    c
}

/// Every request gets exactly one reply (success or ESHUTDOWN), then EOF.
fn all_answered_then_eof(mut c: RawClient, n: u64) -> (usize, usize) {
    let mut seen = vec![false; n as usize];
    let (mut ok, mut shut) = (0, 0);
    for _ in 0..n {
        let (err, cookie) = c.reply().expect("every request is answered before the close");
        match err {
            0 => ok += 1,
            ESHUTDOWN => shut += 1,
            e => panic!("unexpected error {e}"),
        }
        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
    }
    expect_eof(&mut c.s);
    (ok, shut)
}

#[test]
fn remove_export_with_io_in_flight_answers_everything_then_disconnects() {
    let rig = Rig::new();
    add_slow(&rig, "slow");
    rig.add_malloc("other", 8, 512, false);
    let c1 = pipeline_writes(rig.port(), "slow", 100);
    let c2 = pipeline_writes(rig.port(), "slow", 100);
    let mut bystander = RawClient::connect(rig.port(), "other").expect("connect");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.server.exports()[0].connections, 2);
    let t0 = Instant::now();
    rig.server.remove_export("slow").expect("remove");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(6), "remove_export took {took:?}");
    let h1 = std::thread::spawn(move || all_answered_then_eof(c1, 100));
    let h2 = std::thread::spawn(move || all_answered_then_eof(c2, 100));
    let (a, b) = (h1.join().expect("c1"), h2.join().expect("c2"));
    eprintln!("after remove_export in {took:?}: c1 ok/eshutdown {a:?}, c2 {b:?}");
    assert!(a.0 > 0 && b.0 > 0, "requests admitted before the removal complete successfully");
    assert_eq!(rig.server.remove_export("slow"), Err(tiercache_engine::Errno::ENODEV));
    assert!(RawClient::connect(rig.port(), "slow").is_err(), "removed export cannot be selected");
    // The other export's connection was not touched.
    assert_eq!(bystander.write(1, 0, &[3; 512], 0).expect("write"), 0);
    bystander.disconnect();
    still_works(&rig, "other");
}

#[test]
fn stop_with_io_in_flight_answers_everything_then_disconnects_and_removes_the_socket() {
    let rig = Rig::new();
    add_slow(&rig, "slow");
    rig.add_malloc("m", 8, 512, false);
    let c1 = pipeline_writes(rig.port(), "slow", 64);
    let c2 = pipeline_writes(rig.port(), "m", 64);
    let idle = RawClient::connect(rig.port(), "m").expect("idle client");
    let mut handshaking = TcpStream::connect(("127.0.0.1", rig.port())).expect("connect");
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    rig.server.stop();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(6), "stop took {took:?}");
    let (a, _) = all_answered_then_eof(c1, 64);
    all_answered_then_eof(c2, 64);
    assert!(a > 0);
    let mut idle = idle;
    expect_eof(&mut idle.s);
    expect_eof(&mut handshaking);
    assert!(!rig.unix.exists(), "unix socket file removed");
    assert!(rig.server.listeners().is_empty());
    assert!(TcpStream::connect(("127.0.0.1", rig.port())).is_err(), "listener closed");
    rig.server.stop(); // idempotent
    eprintln!("stop took {took:?}");
}

#[test]
fn listen_variants_and_stale_socket() {
    let rig = Rig::new();
    rig.add_malloc("m", 8, 512, false);
    // A second listener on the same server; port 0 resolved.
    let extra = rig.server.listen(&tiercache_nbd::ListenAddr::parse("localhost:0").expect("parse")).expect("listen");
    assert!(!extra.ends_with(":0"), "{extra}");
    assert_eq!(rig.server.listeners().len(), 3);
    // A live socket path is refused; a stale one is replaced.
    let live = rig.server.listen(&tiercache_nbd::ListenAddr::Unix(rig.unix.clone()));
    assert!(live.is_err(), "live socket must not be stolen");
    let stale = rig.dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    rig.server.listen(&tiercache_nbd::ListenAddr::Unix(stale.clone())).expect("stale replaced");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&stale).expect("meta").permissions());
    assert_eq!(mode & 0o777, 0o660);
    // A regular file is never removed.
    let file = rig.dir.path().join("file");
    std::fs::write(&file, b"keep").expect("write");
    assert!(rig.server.listen(&tiercache_nbd::ListenAddr::Unix(file.clone())).is_err());
    assert_eq!(std::fs::read(&file).expect("read"), b"keep");
    // Errors of add_export.
    let b = MallocBdev::create("dup", 16, 512).expect("malloc");
    assert_eq!(rig.server.add_export("m", BdevDesc::new(b.clone()), false, None), Err(tiercache_engine::Errno::EEXIST));
    assert_eq!(rig.server.add_export("", BdevDesc::new(b), false, None), Err(tiercache_engine::Errno::EINVAL));
    let _keep: Option<Arc<()>> = None;
}
