//! Crash consistency over NBD (issue 6): a writer (python3-libnbd) writes self-describing
//! 4 KiB blocks at random to a writeback cached bdev on uring files and FLUSHes at random
//! intervals; the daemon is SIGKILLed at a random moment and restarted on the same files;
//! every block must then be well formed (checksum, block number) or never written, and no
//! older than the last sequence number a completed FLUSH covered for it.
//!
//! Seeded: the seed is printed; `TIERCACHE_CRASH_SEED=<n>` replays a run,
//! `TIERCACHE_CRASH_ROUNDS=<n>` sets the number of crashes (default 10).

mod rpc_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rpc_support::{write_file, Daemon, TempDir};
use serde_json::{json, Value};

const CACHE_MIB: u64 = 24;
/// 1 MiB of backing header area + the volume.
const CORE_MIB: u64 = 9;
const VOLUME_BLOCKS: u64 = 2048;

/// Writes until the connection dies; after each completed FLUSH, the state file holds
/// `durable` (block -> newest sequence written before that FLUSH was issued) and `written`
/// (block -> newest sequence ever issued, acknowledged or not).
const WRITER: &str = r#"
import nbd, sys, struct, zlib, random, json, os
uri, seed, nblocks, first_seq, state = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rng = random.Random(seed)
h = nbd.NBD(); h.connect_uri(uri)
MAGIC = 0x7463637261736821
acked, written, durable = {}, {}, {}
def save():
    tmp = state + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"durable": durable, "written": written}, f)
    os.replace(tmp, state)
save()
print("ready", flush=True)
seq = first_seq
next_flush = rng.randint(1, 40)
try:
    while True:
        seq += 1
        b = rng.randrange(nblocks)
        head = struct.pack("<QQQ", MAGIC, b, seq) + (seq.to_bytes(8, "little") * 509)[:4068]
        data = head + struct.pack("<I", zlib.crc32(head))
        written[b] = seq
        h.pwrite(data, b * 4096)
        acked[b] = seq
        next_flush -= 1
        if next_flush == 0:
            covered = dict(acked)
            h.flush()
            durable.update(covered)
            save()
            next_flush = rng.randint(1, 40)
except nbd.Error:
    pass
save()
"#;

/// Prints, for every block: its sequence number, 0 if all zeros, -1 if malformed.
const CHECKER: &str = r#"
import nbd, sys, struct, zlib, json
h = nbd.NBD(); h.connect_uri(sys.argv[1])
n = int(sys.argv[2])
MAGIC = 0x7463637261736821
out = []
for b in range(n):
    d = h.pread(4096, b * 4096)
    if d == bytes(4096):
        out.append(0); continue
    magic, blk, seq = struct.unpack("<QQQ", d[:24])
    ok = magic == MAGIC and blk == b and struct.unpack("<I", d[4092:])[0] == zlib.crc32(d[:4092]) \
        and d[24:4092] == (seq.to_bytes(8, "little") * 509)[:4068]
    out.append(seq if ok else -1)
h.shutdown()
print(json.dumps(out))
"#;

fn python() -> &'static str {
    for p in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(p)
            .args(["-c", "import nbd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return p;
        }
    }
    panic!("no python3 with the libnbd bindings (apt-get install python3-libnbd; scripts/test.sh does it)");
}

/// A child process killed on drop.
struct Kid(Option<Child>);

impl Drop for Kid {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn env_u64(k: &str) -> Option<u64> {
    std::env::var(k).ok().and_then(|v| v.trim().parse().ok())
}

fn start(dir: &Path, round: u64, format: bool) -> (Daemon, PathBuf) {
    let sock = dir.join(format!("nbd{round}.sock"));
    let cfg = json!({"subsystems":[
        {"subsystem":"bdev","config":[
            {"method":"bdev_uring_create","params":{"name":"ssd0","filename":dir.join("cache.img"),"block_size":4096}},
            {"method":"bdev_uring_create","params":{"name":"hdd0","filename":dir.join("core.img"),"block_size":4096}},
            {"method":"bdev_cache_create","params":{"name":"c0","mode":"writeback","cache_bdev_name":"ssd0",
                "core_bdev_name":"hdd0","format":format,"segment_size_kib":128}}]},
        {"subsystem":"nbd","config":[
            {"method":"nbd_server_start","params":{"listen":format!("unix:{}", sock.display())}},
            {"method":"nbd_export_add","params":{"bdev_name":"c0"}}]}]});
    let path = write_file(dir, &format!("round{round}.json"), &cfg.to_string());
    let d = Daemon::start(dir, &format!("d{round}"), &["--config", path.to_str().expect("utf-8")]);
    (d, sock)
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///c0?socket={}", sock.display())
}

/// Checks every block against what was written and flushed.
fn check(d: &Daemon, sock: &Path, durable: &HashMap<u64, i64>, written: &HashMap<u64, i64>, ctx: &str) {
    let out = Command::new(python())
        .arg("-c")
        .arg(CHECKER)
        .arg(uri(sock))
        .arg(VOLUME_BLOCKS.to_string())
        .output()
        .expect("run the checker");
    assert!(
        out.status.success(),
        "{ctx}: checker failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.stderr_text()
    );
    let seqs: Vec<i64> = serde_json::from_slice(&out.stdout).expect("checker output");
    assert_eq!(seqs.len() as u64, VOLUME_BLOCKS);
    let mut bad = Vec::new();
    for (b, &s) in seqs.iter().enumerate() {
        let b = b as u64;
        let want = durable.get(&b).copied().unwrap_or(0);
        let max = written.get(&b).copied().unwrap_or(0);
        let why = if s < 0 {
            "torn or misdirected (bad checksum, block number or payload)"
        } else if s < want {
            "older than the last flushed version"
        } else if s > max {
            "a version never written to it"
        } else {
            continue;
        };
        bad.push(format!("block {b}: read seq {s}, flushed {want}, newest written {max}: {why}"));
    }
    assert!(
        bad.is_empty(),
        "{ctx}: {} bad blocks:\n{}",
        bad.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

fn merge(into: &mut HashMap<u64, i64>, v: &Value) {
    if let Some(o) = v.as_object() {
        for (k, s) in o {
            if let (Ok(b), Some(s)) = (k.parse::<u64>(), s.as_i64()) {
                let e = into.entry(b).or_insert(0);
                *e = (*e).max(s);
            }
        }
    }
}

#[test]
fn sigkill_never_loses_flushed_writes_nor_tears_blocks() {
    let seed = env_u64("TIERCACHE_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let rounds = env_u64("TIERCACHE_CRASH_ROUNDS").unwrap_or(10).max(1);
    println!("nbd_crash: seed {seed} ({rounds} crashes); replay with TIERCACHE_CRASH_SEED={seed}");
    eprintln!("nbd_crash: seed {seed} ({rounds} crashes); replay with TIERCACHE_CRASH_SEED={seed}");
    let mut rng = SplitMix(seed);
    // On the disk the build is on (not a tmpfs): uring with O_DIRECT, real FLUSH.
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = TempDir(base.join(format!("nbd-crash-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(dir.path());
    std::fs::create_dir_all(dir.path()).expect("temp dir");
    for (f, mib) in [("cache.img", CACHE_MIB), ("core.img", CORE_MIB)] {
        std::fs::File::create(dir.join(f)).unwrap().set_len(mib << 20).unwrap();
    }
    let state = dir.join("state.json");
    let (mut durable, mut written) = (HashMap::new(), HashMap::new());
    let started = Instant::now();
    for round in 0..rounds {
        let (mut d, sock) = start(dir.path(), round, round == 0);
        let ctx = format!("seed {seed} round {round}");
        if round > 0 {
            check(&d, &sock, &durable, &written, &ctx);
        }
        let _ = std::fs::remove_file(&state);
        let mut w = Kid(Some(
            Command::new(python())
                .arg("-c")
                .arg(WRITER)
                .arg(uri(&sock))
                .arg(rng.next().to_string())
                .arg(VOLUME_BLOCKS.to_string())
                .arg(((round + 1) * 100_000_000).to_string())
                .arg(&state)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn the writer"),
        ));
        let mut line = String::new();
        let stdout = w.0.as_mut().and_then(|c| c.stdout.take()).expect("writer stdout");
        BufReader::new(stdout).read_line(&mut line).expect("writer output");
        assert_eq!(line.trim(), "ready", "{ctx}: writer did not start");
        let after = Duration::from_millis(rng.range(100, 900));
        std::thread::sleep(after);
        let mut c = d.child.take().expect("daemon running");
        c.kill().expect("SIGKILL the daemon");
        let _ = c.wait();
        // The writer sees its connection die and records its final state.
        let mut child = w.0.take().expect("writer");
        let deadline = Instant::now() + Duration::from_secs(20);
        let st = loop {
            if let Some(st) = child.try_wait().expect("wait writer") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{ctx}: the writer did not notice the crash in 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        assert!(st.success(), "{ctx}: writer failed: {err}");
        let s: Value =
            serde_json::from_str(&std::fs::read_to_string(&state).expect("writer state")).expect("state json");
        merge(&mut durable, &s["durable"]);
        merge(&mut written, &s["written"]);
        println!(
            "round {round}: killed after {} ms; {} blocks written, {} flushed so far",
            after.as_millis(),
            written.len(),
            durable.len()
        );
    }
    let (d, sock) = start(dir.path(), rounds, false);
    check(&d, &sock, &durable, &written, &format!("seed {seed} final"));
    assert!(!durable.is_empty(), "no FLUSH completed in any round: the test proved nothing");
    println!("nbd_crash: {rounds} crashes, all blocks consistent, {:.1} s", started.elapsed().as_secs_f64());
}
