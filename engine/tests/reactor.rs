//! Reactor runtime: tasks, messages across reactors, timers, io_uring file I/O, idling.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiercache_engine::reactor::{self, FileIo, FileOpKind, ReactorConfig, ReactorSet};
use tiercache_engine::{Errno, IoBuf};

fn set(n: usize) -> ReactorSet {
    ReactorSet::start(ReactorConfig::unpinned(n)).expect("start reactors")
}

#[test]
fn run_on_returns_results_from_each_reactor() {
    let s = set(2);
    for r in 0..2 {
        let got = s.block_on(r, move || async move { (reactor::current(), reactor::count()) }).unwrap();
        assert_eq!(got, (Some(r), 2));
    }
    s.stop();
}

#[test]
fn messages_hop_between_reactors_and_back() {
    let s = set(2);
    let hops = Arc::new(AtomicUsize::new(0));
    let h = hops.clone();
    let set2 = s.clone();
    // Reactor 0 asks reactor 1 to increment 1000 times, awaiting each answer.
    let total = s
        .block_on(0, move || async move {
            for _ in 0..1000 {
                let h = h.clone();
                let who = set2.run_on(1, move || async move {
                    h.fetch_add(1, Ordering::Relaxed);
                    reactor::current()
                });
                assert_eq!(who.await.unwrap(), Some(1));
            }
            h.load(Ordering::Relaxed)
        })
        .unwrap();
    assert_eq!(total, 1000);
    assert_eq!(hops.load(Ordering::Relaxed), 1000);
    s.stop();
}

#[test]
fn spawned_tasks_join_and_timers_fire_in_order() {
    let s = set(1);
    let order = s
        .block_on(0, || async {
            let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let mut joins = Vec::new();
            for (i, ms) in [30u64, 10, 20].into_iter().enumerate() {
                let log = log.clone();
                joins.push(reactor::spawn(async move {
                    reactor::sleep(Duration::from_millis(ms)).await;
                    log.borrow_mut().push(i);
                    i * 10
                }));
            }
            let mut sum = 0;
            for j in joins {
                sum += j.await;
            }
            assert_eq!(sum, 30);
            let v = log.borrow().clone();
            v
        })
        .unwrap();
    assert_eq!(order, vec![1, 2, 0]);
    s.stop();
}

#[test]
fn file_io_writes_and_reads_back_through_the_ring() {
    let dir = std::env::temp_dir().join(format!("tc-reactor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("f");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let s = set(1);
    let ok = s
        .block_on(0, move || async move {
            let mut buf = IoBuf::new(8192);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            // SAFETY: the file outlives the I/O (it is closed after block_on returns).
            let (r, _) = unsafe { FileIo::new(fd, FileOpKind::Write { fua: true }, 4096, 8192, Some(buf)) }.await;
            r.unwrap();
            let rb = IoBuf::new(8192);
            // SAFETY: as above.
            let (r, rb) = unsafe { FileIo::new(fd, FileOpKind::Read, 4096, 8192, Some(rb)) }.await;
            r.unwrap();
            let rb = rb.unwrap();
            // Past EOF reads as zeros.
            let tail = IoBuf::new(4096);
            // SAFETY: as above.
            let (r, tail) = unsafe { FileIo::new(fd, FileOpKind::Read, 1 << 20, 4096, Some(tail)) }.await;
            r.unwrap();
            rb.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8) && tail.unwrap().iter().all(|b| *b == 0)
        })
        .unwrap();
    assert!(ok);
    // A bad fd is an errno, not a panic.
    let e = s
        .block_on(0, || async {
            // SAFETY: -1 is never a valid fd, the kernel rejects it; no memory is at risk.
            unsafe { FileIo::new(-1, FileOpKind::Flush, 0, 0, None) }.await.0
        })
        .unwrap();
    assert_eq!(e, Err(Errno(libc::EBADF)));
    s.stop();
    drop(f);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn idle_reactors_sleep_and_wake_on_messages() {
    let s = set(2);
    std::thread::sleep(Duration::from_millis(300));
    let before = s.stats();
    std::thread::sleep(Duration::from_millis(500));
    let after = s.stats();
    for (b, a) in before.iter().zip(&after) {
        // A sleeping reactor iterates rarely: far fewer than a spinning one (millions/s).
        assert!(
            a.iterations - b.iterations < 1000,
            "reactor {} kept spinning: {} iterations",
            a.index,
            a.iterations - b.iterations
        );
    }
    let t = Instant::now();
    let v = s.block_on(1, || async { 42 }).unwrap();
    assert_eq!(v, 42);
    assert!(t.elapsed() < Duration::from_millis(200), "wake-up took {:?}", t.elapsed());
    s.stop();
}

#[test]
fn busy_poll_reactors_never_sleep() {
    let cfg = ReactorConfig { busy_poll: true, ..ReactorConfig::unpinned(1) };
    let s = ReactorSet::start(cfg).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let st = &s.stats()[0];
    assert_eq!(st.sleeps, 0);
    assert!(st.iterations > 1000);
    s.stop();
}

#[test]
fn stop_drops_pending_tasks_and_run_on_reports_cancel() {
    let s = set(1);
    let s2 = s.clone();
    let pending =
        std::thread::spawn(move || s2.block_on(0, || async { reactor::sleep(Duration::from_secs(3600)).await }));
    std::thread::sleep(Duration::from_millis(50));
    s.stop();
    assert_eq!(pending.join().unwrap(), Err(reactor::Canceled));
    // Work sent after stop is refused, not lost silently.
    assert_eq!(s.block_on(0, || async { 1 }), Err(reactor::Canceled));
}

#[test]
fn core_lists_parse_and_reject_garbage() {
    assert_eq!(ReactorConfig::parse_core_list("0,1").unwrap(), vec![0, 1]);
    assert_eq!(ReactorConfig::parse_core_list("2,4-6").unwrap(), vec![2, 4, 5, 6]);
    assert!(ReactorConfig::parse_core_list("").is_err());
    assert!(ReactorConfig::parse_core_list("1,1").is_err());
    assert!(ReactorConfig::parse_core_list("3-1").is_err());
    assert!(ReactorConfig::parse_core_list("x").is_err());
}

/// Receive everything until `want` bytes arrived, through a multishot receive.
async fn recv_multi_all(st: &mut reactor::net::RecvMulti, want: usize) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    while got.len() < want {
        match std::future::poll_fn(|cx| st.poll_recv(cx)).await {
            reactor::net::RecvEvent::Data { bid, len } => {
                got.extend_from_slice(st.chunk(bid, len));
                st.recycle(bid);
            }
            other => return Err(format!("unexpected {other:?} after {} bytes", got.len())),
        }
    }
    Ok(got)
}

fn multishot_round_trip(defer_taskrun: bool) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let cfg = ReactorConfig { defer_taskrun, ..ReactorConfig::unpinned(1) };
    let s = ReactorSet::start(cfg).unwrap();
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    // More data than the provided buffers hold at once (4 × 1 KiB): the receive ends with
    // ENOBUFS and must re-arm itself.
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            b.write_all(&data).unwrap();
            b
        })
    };
    let fd = a.as_raw_fd();
    let n = data.len();
    let r = s
        .block_on(0, move || async move {
            let mut st = reactor::net::RecvMulti::new(fd, 4, 1024).map_err(|e| e.to_string())?;
            let first = recv_multi_all(&mut st, n / 2).await?;
            // Pause: what arrived before is delivered, then Paused; polling again resumes.
            st.pause();
            let mut rest = first;
            loop {
                match std::future::poll_fn(|cx| st.poll_recv(cx)).await {
                    reactor::net::RecvEvent::Data { bid, len } => {
                        rest.extend_from_slice(st.chunk(bid, len));
                        st.recycle(bid);
                    }
                    reactor::net::RecvEvent::Paused => break,
                    other => return Err(format!("unexpected {other:?} while pausing")),
                }
            }
            let more = recv_multi_all(&mut st, n - rest.len()).await?;
            rest.extend_from_slice(&more);
            Ok::<_, String>((rest, st))
        })
        .unwrap();
    let (got, st) = r.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
    // The peer closes: EOF. Dropping a stream whose receive is armed cancels it.
    let mut b = writer.join().unwrap();
    b.flush().unwrap();
    drop(b);
    let end = s
        .block_on(0, move || async move {
            let mut st = st;
            let ev = std::future::poll_fn(|cx| st.poll_recv(cx)).await;
            let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
            let armed = reactor::net::RecvMulti::new(c.as_raw_fd(), 2, 512).unwrap();
            let mut armed = armed;
            // Arm it (nothing to read), then drop it with the receive in flight.
            let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(armed.poll_recv(cx).is_pending())).await;
            drop(armed);
            reactor::sleep(Duration::from_millis(20)).await;
            drop(c);
            (ev, polled, reactor::uring_stats().map(|u| u.submitted))
        })
        .unwrap();
    assert_eq!(end.0, reactor::net::RecvEvent::Eof);
    assert!(end.1, "an idle socket's multishot receive is pending");
    s.stop();
}

#[test]
fn multishot_receive_delivers_a_stream_in_order_pauses_and_ends() {
    multishot_round_trip(false);
}

#[test]
fn multishot_receive_with_defer_taskrun() {
    multishot_round_trip(true);
}

#[test]
fn vectored_send_sends_pieces_of_owned_buffers_in_order() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let s = set(1);
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = a.as_raw_fd();
    let (sent, bufs) = s
        .block_on(0, move || async move {
            let mut v = reactor::net::IoVecs::new();
            let h = v.push_buf(IoBuf::from_slice(b"0123456789"));
            let d = v.push_buf(IoBuf::from_slice(b"abcdef"));
            assert!(v.push_seg(h, 0, 3));
            assert!(v.push_seg(h, 3, 2)); // merged with the previous piece
            assert!(v.push_seg(d, 1, 4));
            assert!(v.push_seg(h, 8, 2));
            assert!(!v.push_seg(d, 4, 3), "a piece past the end of its buffer is refused");
            assert_eq!((v.segs(), v.total()), (3, 11));
            // Skip 2 bytes, as after a short send.
            let (r, mut v) = reactor::net::sendv(fd, v, 2).await;
            let n = v.clear().count();
            (r.map_err(|e| e.to_string()), n)
        })
        .unwrap();
    assert_eq!(sent, Ok(9));
    assert_eq!(bufs, 2);
    let mut got = [0u8; 9];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"234bcde89");
    s.stop();
}
