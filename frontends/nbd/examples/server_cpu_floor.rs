//! The CPU floor of an NBD-like server on this machine: the least work any server must do
//! per 4K read request of `fio --ioengine=nbd --rw=randread --bs=4k --iodepth=32`, with
//! nothing else — no protocol parsing, no bdev layer, no event loop.
//!
//! The "server" (this process, to be pinned with `taskset -c 0`) does, per batch of
//! `--batch` requests: one blocking `read` of the batch's 28-byte requests, one 4K copy per
//! request out of a `--size-mib` RAM buffer at a random 4K offset (what a RAM bdev does),
//! and one blocking `write` of the replies (16-byte header + 4K each). The client, a child
//! process of this binary pinned to `--client-core`, keeps `--depth` requests in flight.
//! Blocking sockets mean the server sleeps in the kernel whenever it waits, as a reactor
//! does when it has nothing to do.
//!
//! That client hands the server whole batches, which fio does not: `--single-sends`
//! makes the client send each request on its own and the next one as each reply comes in
//! (one TCP segment per request, as libnbd under fio sends them), and the server take
//! whatever has arrived per `read`, after sleeping `--hold-us` to let requests gather.
//! `--uring` serves that traffic the way a reactor can at its cheapest: one io_uring with a
//! receive and a send in flight, and one `io_uring_enter` per wake-up that submits both
//! and waits, instead of a blocking `read` and `write`.
//!
//! Printed: requests per second and the server's CPU (utime + stime of this process,
//! from /proc/self/stat) per request. Compare with `scripts/bench-nbd.sh`'s "server CPU
//! µs/I/O" (docs/benchmarks.md, NBD).
//!
//! ```sh
//! cargo build --release -p tiercache-nbd --example server_cpu_floor
//! taskset -c 0 target/release/examples/server_cpu_floor --seconds 5
//! taskset -c 0 target/release/examples/server_cpu_floor --seconds 5 --single-sends --batch 32 --hold-us 20
//! taskset -c 0 target/release/examples/server_cpu_floor --seconds 5 --single-sends --batch 32 --uring
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

const REQ: usize = 28;
const BLOCK: usize = 4096;
const REPLY: usize = 16 + BLOCK;

#[derive(Parser)]
struct Args {
    /// Run as the client, connecting to this address (used by the server to spawn it).
    #[arg(long)]
    client: Option<String>,
    /// Requests the client keeps in flight.
    #[arg(long, default_value_t = 32)]
    depth: usize,
    /// Requests per server read / reply write.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Size of the RAM buffer the copies come from.
    #[arg(long, default_value_t = 1024)]
    size_mib: usize,
    /// Allocate the buffer in stripes of this many MiB, each its own allocation (the
    /// malloc bdev's 1 MiB stripes); 0: one allocation.
    #[arg(long, default_value_t = 0)]
    stripe_mib: usize,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 1)]
    client_core: usize,
    /// Traffic as fio's nbd engine sends it: the client writes each request on its own
    /// (one TCP segment each) and sends the next one as each reply arrives, and the
    /// server takes whatever has arrived per `read` instead of whole batches.
    #[arg(long)]
    single_sends: bool,
    /// With `--single-sends`: how long the server sleeps before each `read` so that
    /// requests gather (the NBD server's receive hold); 0: read at once.
    #[arg(long, default_value_t = 0)]
    hold_us: u64,
    /// With `--single-sends`: serve through one io_uring, a receive and a send in flight and
    /// one `io_uring_enter` per wake-up that submits and waits, instead of blocking
    /// `read` / `write`.
    #[arg(long, requires = "single_sends")]
    uring: bool,
}

fn main() -> std::io::Result<()> {
    let a = Args::parse();
    if a.depth == 0 || a.batch == 0 || a.depth % a.batch != 0 {
        eprintln!("--depth must be a positive multiple of --batch");
        std::process::exit(2);
    }
    match &a.client {
        Some(addr) => client(addr, &a),
        None => server(&a),
    }
}

/// Keep `depth` requests in flight, `batch` per write, until the server closes.
fn client(addr: &str, a: &Args) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let reqs = vec![0u8; REQ * a.batch];
    let mut replies = vec![0u8; REPLY * a.batch];
    for _ in 0..a.depth / a.batch {
        s.write_all(&reqs)?;
    }
    if a.single_sends {
        let one = vec![0u8; REQ];
        let mut reply = vec![0u8; REPLY];
        for _ in 0..a.depth {
            s.write_all(&one)?;
        }
        loop {
            if s.read_exact(&mut reply).is_err() || s.write_all(&one).is_err() {
                return Ok(());
            }
        }
    }
    loop {
        if s.read_exact(&mut replies).is_err() {
            return Ok(());
        }
        if s.write_all(&reqs).is_err() {
            return Ok(());
        }
    }
}

fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

fn server(a: &Args) -> std::io::Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let exe = std::env::current_exe()?;
    let mut child = Command::new("taskset")
        .arg("-c")
        .arg(a.client_core.to_string())
        .arg(exe)
        .args(["--client", &addr, "--depth", &a.depth.to_string(), "--batch", &a.batch.to_string()])
        .args(a.single_sends.then_some("--single-sends"))
        .stdin(Stdio::null())
        .spawn()?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;

    let mut store = Store::new(a);
    let run = Duration::from_secs(a.seconds);
    let (t0, c0) = (Instant::now(), cpu_ticks());
    let (done, enters) = if a.uring {
        serve_uring(&s, a, &mut store, t0 + run)?
    } else {
        serve_blocking(&mut s, a, &mut store, t0 + run)?
    };
    let (secs, ticks) = (t0.elapsed().as_secs_f64(), cpu_ticks() - c0);
    drop(s);
    let _ = child.wait();
    // Kernel clock ticks: 100 per second on Linux (USER_HZ).
    let cpu_us = ticks as f64 * 10_000.0;
    println!(
        "{:.0} requests/s, server CPU {:.2} µs per request, {:.2} syscalls per request ({}, batch {}, depth {}, {} MiB)",
        done as f64 / secs,
        cpu_us / done as f64,
        enters as f64 / done.max(1) as f64,
        if a.uring { "io_uring" } else { "blocking read/write" },
        a.batch,
        a.depth,
        a.size_mib
    );
    Ok(())
}

/// The RAM the replies are copied from, touched up front as a filled RAM bdev is, and the
/// generator of the random 4K offsets.
struct Store {
    stripes: Vec<Vec<u8>>,
    blocks: u64,
    per_stripe: usize,
    x: u64,
}

impl Store {
    fn new(a: &Args) -> Store {
        let stripe = if a.stripe_mib == 0 { a.size_mib << 20 } else { a.stripe_mib << 20 };
        let stripes: Vec<Vec<u8>> = (0..(a.size_mib << 20) / stripe)
            .map(|k| (0..stripe).map(|i| ((k * stripe + i) >> 12) as u8).collect())
            .collect();
        Store {
            stripes,
            blocks: ((a.size_mib << 20) / BLOCK) as u64,
            per_stripe: stripe / BLOCK,
            x: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Write the reply to the 28-byte request `req` into `out` (`REPLY` bytes): its first 16
    /// bytes as the header, then 4K from a random block.
    fn reply(&mut self, req: &[u8], out: &mut [u8]) {
        debug_assert!(req.len() == REQ && out.len() == REPLY);
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        let b = (self.x % self.blocks) as usize;
        let (k, off) = (b / self.per_stripe, (b % self.per_stripe) * BLOCK);
        out[..16].copy_from_slice(&req[..16]);
        out[16..].copy_from_slice(&self.stripes[k][off..off + BLOCK]);
    }
}

/// Blocking `read` and `write`: two syscalls per wake-up. Returns (requests, syscalls).
fn serve_blocking(s: &mut TcpStream, a: &Args, store: &mut Store, end: Instant) -> std::io::Result<(u64, u64)> {
    let mut reqs = vec![0u8; REQ * a.batch];
    let mut out = vec![0u8; REPLY * a.batch];
    let (mut done, mut calls) = (0u64, 0u64);
    // --single-sends: requests received so far (a read may end inside one).
    let mut rx = vec![0u8; REQ * a.depth];
    let mut have = 0usize;
    while Instant::now() < end {
        let n = if a.single_sends {
            if a.hold_us > 0 {
                std::thread::sleep(Duration::from_micros(a.hold_us));
            }
            let got = s.read(&mut rx[have..])?;
            if got == 0 {
                break;
            }
            have += got;
            let n = (have / REQ).min(a.batch);
            reqs[..n * REQ].copy_from_slice(&rx[..n * REQ]);
            rx.copy_within(n * REQ..have, 0);
            have -= n * REQ;
            n
        } else {
            s.read_exact(&mut reqs)?;
            a.batch
        };
        for i in 0..n {
            store.reply(&reqs[i * REQ..(i + 1) * REQ], &mut out[i * REPLY..(i + 1) * REPLY]);
        }
        s.write_all(&out[..n * REPLY])?;
        calls += 2;
        done += n as u64;
    }
    Ok((done, calls))
}

const RECV_TAG: u64 = 1;
const SEND_TAG: u64 = 2;

/// One io_uring (single issuer, deferred task work), one receive and one send in flight at
/// most, and a single `io_uring_enter` per wake-up that both submits and waits: the fewest
/// syscalls a reactor can make for this traffic. Replies built while a send is in flight
/// gather in a second buffer and go out together when it completes. Returns (requests,
/// enters).
fn serve_uring(s: &TcpStream, a: &Args, store: &mut Store, end: Instant) -> std::io::Result<(u64, u64)> {
    use io_uring::{opcode, types, IoUring};
    use std::os::fd::AsRawFd;
    let mut ring: IoUring =
        IoUring::builder().setup_single_issuer().setup_coop_taskrun().setup_defer_taskrun().build(16)?;
    let fd = types::Fd(s.as_raw_fd());
    // Never reallocated: the kernel holds raw pointers into them while an operation is in
    // flight. At most `depth` requests are outstanding, so `depth` replies bound both.
    let mut rx = vec![0u8; REQ * a.depth];
    let mut have = 0usize;
    let mut tx = vec![0u8; REPLY * a.depth];
    let (mut tx_len, mut tx_off) = (0usize, 0usize);
    let mut pend = vec![0u8; REPLY * a.depth];
    let mut pend_len = 0usize;
    let (mut recv_busy, mut send_busy) = (false, false);
    let (mut done, mut enters) = (0u64, 0u64);
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(4);
    while Instant::now() < end {
        if !recv_busy {
            if a.hold_us > 0 {
                std::thread::sleep(Duration::from_micros(a.hold_us));
            }
            debug_assert!(have < rx.len(), "more than depth requests outstanding");
            let e =
                opcode::Recv::new(fd, rx[have..].as_mut_ptr(), (rx.len() - have) as u32).build().user_data(RECV_TAG);
            // SAFETY: `rx` is neither moved, resized nor touched until this receive's
            // completion is reaped below (`recv_busy` guards it), and lives past the loop.
            unsafe { ring.submission().push(&e) }.map_err(|_| std::io::Error::other("SQ full"))?;
            recv_busy = true;
        }
        // The next batch goes out only once the last one is sent whole (a short send
        // leaves `tx_off < tx_len`, and its rest is sent first).
        if !send_busy && tx_off == tx_len && pend_len > 0 {
            std::mem::swap(&mut tx, &mut pend);
            (tx_len, tx_off, pend_len) = (pend_len, 0, 0);
        }
        if !send_busy && tx_off < tx_len {
            let e = opcode::Send::new(fd, tx[tx_off..tx_len].as_ptr(), (tx_len - tx_off) as u32)
                .build()
                .user_data(SEND_TAG);
            // SAFETY: `tx` is not swapped, resized or written while `send_busy` is set, and
            // lives past the loop; the kernel only reads it.
            unsafe { ring.submission().push(&e) }.map_err(|_| std::io::Error::other("SQ full"))?;
            send_busy = true;
        }
        ring.submit_and_wait(1)?;
        enters += 1;
        cqes.clear();
        cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for &(tag, res) in &cqes {
            if res < 0 {
                return Err(std::io::Error::from_raw_os_error(-res));
            }
            let res = res as usize;
            match tag {
                RECV_TAG => {
                    recv_busy = false;
                    if res == 0 {
                        return Ok((done, enters));
                    }
                    have += res;
                    let n = have / REQ;
                    for i in 0..n {
                        let out = &mut pend[pend_len..pend_len + REPLY];
                        store.reply(&rx[i * REQ..(i + 1) * REQ], out);
                        pend_len += REPLY;
                    }
                    rx.copy_within(n * REQ..have, 0);
                    have -= n * REQ;
                    done += n as u64;
                }
                SEND_TAG => {
                    send_busy = false;
                    tx_off += res;
                }
                _ => debug_assert!(false, "unknown completion tag {tag}"),
            }
        }
    }
    Ok((done, enters))
}
