//! The cache methods wired to the engine's failure handling and policies: options and
//! sequential cut-off (with the save_config round trip), stats and their reset, detach with
//! `--wait` and re-attach (data served throughout, over NBD), and the export watcher that
//! tears down the NBD export of a cached bdev that died.

mod rpc_support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rpc_support::{cli, write_file, Daemon, TempDir};
use serde_json::{json, Value};

const INVALID_PARAMS: i32 = -32602;
const ENODEV: i32 = -19;
const EBUSY: i32 = -16;
const EOPNOTSUPP: i32 = -95;

const MALLOC: &str = r#"{"subsystems":[
  {"subsystem":"bdev","config":[
    {"method":"bdev_malloc_create","params":{"name":"ssd0","num_blocks":16384,"block_size":4096}},
    {"method":"bdev_malloc_create","params":{"name":"hdd0","num_blocks":32768,"block_size":4096}},
    {"method":"bdev_malloc_create","params":{"name":"hdd1","num_blocks":32768,"block_size":4096}}]},
  {"subsystem":"nbd","config":[]}]}"#;

/// A Python 3 that has libnbd's bindings (`import nbd`).
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

/// Runs a Python script (libnbd) with `args`; panics with its stderr unless it succeeds.
fn py(script: &str, args: &[&str]) -> String {
    let out = Command::new(python()).arg("-c").arg(script).args(args).output().expect("run python3");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Writes blocks [first, first+n) with a pattern of `tag`, then FLUSH.
const WRITE: &str = r#"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
first, n, tag = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for b in range(first, first + n):
    h.pwrite(bytes([(b * 7 + tag) % 256]) * 4096, b * 4096)
h.flush(); h.shutdown()
"#;

/// Checks blocks [first, first+n) carry the pattern of `tag`.
const CHECK: &str = r#"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
first, n, tag = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
bad = [b for b in range(first, first + n) if h.pread(4096, b * 4096) != bytes([(b * 7 + tag) % 256]) * 4096]
h.shutdown()
print(len(bad))
"#;

fn write_blocks(sock: &Path, first: u64, n: u64, tag: u8) {
    py(WRITE, &[&uri(sock, "c0"), &first.to_string(), &n.to_string(), &tag.to_string()]);
}

fn bad_blocks(sock: &Path, first: u64, n: u64, tag: u8) -> u64 {
    py(CHECK, &[&uri(sock, "c0"), &first.to_string(), &n.to_string(), &tag.to_string()]).trim().parse().expect("count")
}

fn stats(d: &Daemon) -> Value {
    d.ok("bdev_cache_get_stats", json!({"name":"c0"}))
}

#[test]
fn options_seqcutoff_stats_and_errors() {
    let dir = TempDir::new("cache-opts");
    let cfg = write_file(dir.path(), "c.json", MALLOC);
    let d = Daemon::start(dir.path(), "opts", &["--config", cfg.to_str().unwrap()]);
    d.ok(
        "bdev_cache_create",
        json!({"name":"c0","mode":"wb","cache_bdev_name":"ssd0","core_bdev_name":"hdd0","format":true}),
    );
    let o = &stats(&d)["cache_set"]["options"];
    assert_eq!(o["io_error_limit"], json!(64));
    assert_eq!(o["seq_cutoff_policy"], json!("always"));

    let all = json!({"name":"c0","seal_idle_ms":7,"io_error_limit":9,"io_error_halflife":30,
        "stop_when_cache_set_failed":"always","backing_offline_grace_ms":1500,"promote_after_hits":3});
    assert_eq!(d.ok("bdev_cache_set_options", all), json!(true));
    let o = stats(&d)["cache_set"]["options"].clone();
    assert_eq!(
        (&o["seal_idle_ms"], &o["io_error_limit"], &o["backing_io_error_limit"], &o["io_error_halflife"]),
        (&json!(7), &json!(9), &json!(9), &json!(30))
    );
    assert_eq!(o["stop_when_cache_set_failed"], json!("always"));
    assert_eq!((&o["backing_offline_grace_ms"], &o["promote_after_hits"]), (&json!(1500), &json!(3)));
    // Writeback rate control knobs apply online and show up in the stats; an invalid
    // combination (max below the set's min) applies nothing.
    assert_eq!(
        d.ok(
            "bdev_cache_set_options",
            json!({"name":"c0","writeback_percent":20,"writeback_rate_min":100,"writeback_rate_max":5000,
                   "dirty_write_cutoff_percent":55})
        ),
        json!(true)
    );
    let o = stats(&d)["cache_set"]["options"].clone();
    assert_eq!(
        (&o["writeback_percent"], &o["writeback_rate_min"], &o["writeback_rate_max"], &o["dirty_write_cutoff_percent"]),
        (&json!(20), &json!(100), &json!(5000), &json!(55))
    );
    d.err("bdev_cache_set_options", json!({"name":"c0","dirty_write_cutoff_percent":0}), INVALID_PARAMS);
    assert_eq!(stats(&d)["cache_set"]["options"]["dirty_write_cutoff_percent"], json!(55));
    d.err(
        "bdev_cache_set_options",
        json!({"name":"c0","promote_after_hits":5,"writeback_rate_max":50}),
        INVALID_PARAMS,
    );
    assert_eq!(stats(&d)["cache_set"]["options"]["promote_after_hits"], json!(3));
    // Per-path latency histograms are part of the stats.
    let st = stats(&d);
    for path in ["read_hit", "read_miss", "write", "bypass", "writeback"] {
        assert!(st["latency_us"][path]["count"].is_u64(), "latency path {path} missing: {}", st["latency_us"]);
    }
    d.err("bdev_cache_set_options", json!({"name":"c0","io_error_halflife":0}), INVALID_PARAMS);
    d.err("bdev_cache_set_options", json!({"name":"c0","stop_when_cache_set_failed":"never"}), INVALID_PARAMS);
    d.err("bdev_cache_set_options", json!({"name":"c0","bogus":1}), INVALID_PARAMS);
    d.err("bdev_cache_set_options", json!({"name":"nope","seal_idle_ms":1}), ENODEV);
    d.err("bdev_cache_set_options", json!({"name":"hdd1","seal_idle_ms":1}), ENODEV);

    assert_eq!(d.ok("bdev_cache_set_seqcutoff", json!({"name":"c0","policy":"full","threshold":2048})), json!(true));
    let o = stats(&d)["cache_set"]["options"].clone();
    assert_eq!((&o["seq_cutoff_policy"], &o["seq_cutoff_threshold_kib"]), (&json!("full"), &json!(2048)));
    d.ok("bdev_cache_set_seqcutoff", json!({"name":"c0","policy":"never"}));
    let o = stats(&d)["cache_set"]["options"].clone();
    assert_eq!((&o["seq_cutoff_policy"], &o["seq_cutoff_threshold_kib"]), (&json!("never"), &json!(2048)));
    let e = d.err("bdev_cache_set_seqcutoff", json!({"name":"c0","policy":"always","promotion_count":8}), EOPNOTSUPP);
    assert!(e.contains("promotion_count"), "{e}");
    assert_eq!(stats(&d)["cache_set"]["options"]["seq_cutoff_policy"], json!("never"), "nothing applied");
    d.err("bdev_cache_set_seqcutoff", json!({"name":"c0","policy":"always","threshold":0}), INVALID_PARAMS);
    d.err("bdev_cache_set_seqcutoff", json!({"name":"c0","policy":"sometimes"}), INVALID_PARAMS);
    d.err("bdev_cache_set_seqcutoff", json!({"name":"nope","policy":"never"}), ENODEV);

    let st = stats(&d);
    assert_eq!(st["state"], json!("running"));
    assert_eq!(st["dirty_blocks"], json!(0));
    for k in [
        "read_hits",
        "read_partial_hits",
        "read_misses",
        "write_blocks",
        "write_overwrites_in_buffer",
        "segments_sealed",
        "segments_written",
        "segment_write_errors",
        "conflict_seals",
        "flushes",
        "writeback_blocks",
        "segments_reclaimed",
        "space_waits",
        "promotions",
        "promotions_stale",
        "promotions_skipped",
        "copy_forwards",
        "copy_forwards_dropped",
        "seq_bypasses",
        "full_bypasses",
    ] {
        assert!(st["counters"][k].is_u64(), "counter {k} missing: {st}");
    }
    assert_eq!(d.ok("bdev_cache_get_bdevs", json!({"name":"c0"}))[0]["state"], json!("running"));
    d.err("bdev_cache_get_stats", json!({"name":"hdd0"}), ENODEV);
    d.err("bdev_cache_reset_stats", json!({"name":"nope"}), ENODEV);
}

#[test]
fn save_config_restores_non_default_options() {
    let dir = TempDir::new("cache-save");
    for (f, mib) in [("cache.img", 64u64), ("core.img", 96)] {
        std::fs::File::create(dir.join(f)).unwrap().set_len(mib << 20).unwrap();
    }
    let cfg = json!({"subsystems":[{"subsystem":"bdev","config":[
        {"method":"bdev_uring_create","params":{"name":"ssd0","filename":dir.join("cache.img"),"block_size":4096}},
        {"method":"bdev_uring_create","params":{"name":"hdd0","filename":dir.join("core.img"),"block_size":4096}},
        {"method":"bdev_cache_create","params":{"name":"c0","mode":"wt","cache_bdev_name":"ssd0","core_bdev_name":"hdd0","format":true}}]}]});
    let cfg = write_file(dir.path(), "first.json", &cfg.to_string());
    let mut d = Daemon::start(dir.path(), "save1", &["--config", cfg.to_str().unwrap()]);
    d.ok(
        "bdev_cache_set_options",
        json!({"name":"c0","seal_idle_ms":11,"io_error_limit":5,"io_error_halflife":7,
        "stop_when_cache_set_failed":"always","backing_offline_grace_ms":900,"promote_after_hits":4,
        "dirty_write_cutoff_percent":90}),
    );
    d.ok("bdev_cache_set_seqcutoff", json!({"name":"c0","policy":"full","threshold":512}));
    let before = stats(&d)["cache_set"]["options"].clone();
    let doc = d.ok("save_config", Value::Null);
    let text = doc.to_string();
    assert!(text.contains("bdev_cache_set_options") && text.contains("bdev_cache_set_seqcutoff"), "{text}");
    let saved = write_file(dir.path(), "saved.json", &serde_json::to_string_pretty(&doc).unwrap());
    assert!(d.terminate().success());

    let d = Daemon::start(dir.path(), "save2", &["--config", saved.to_str().unwrap()]);
    let st = stats(&d);
    assert_eq!(st["cache_set"]["options"], before, "options after the replay");
    assert_eq!(st["mode"], json!("writethrough"));
    // A set at its defaults saves no option calls.
    let o = stats(&d)["cache_set"]["options"].clone();
    assert_eq!(o["promote_after_hits"], json!(4));
    assert_eq!(o["dirty_write_cutoff_percent"], json!(90));
}

#[test]
fn detach_with_wait_then_reattach_keeps_serving_the_data() {
    let dir = TempDir::new("cache-detach");
    let cfg = write_file(dir.path(), "c.json", MALLOC);
    let d = Daemon::start(dir.path(), "det", &["--config", cfg.to_str().unwrap()]);
    let sock = dir.join("nbd.sock");
    d.ok(
        "bdev_cache_create",
        json!({"name":"c0","mode":"wb","cache_bdev_name":"ssd0","core_bdev_name":"hdd0","format":true}),
    );
    d.ok("nbd_server_start", json!({"listen": format!("unix:{}", sock.display())}));
    d.ok("nbd_export_add", json!({"bdev_name":"c0"}));

    write_blocks(&sock, 0, 512, 1);
    let st = stats(&d);
    assert!(st["counters"]["write_blocks"].as_u64().unwrap() >= 512, "{st}");
    assert!(st["dirty_blocks"].as_u64().unwrap() > 0, "writeback mode keeps them dirty: {st}");
    assert_eq!(d.ok("bdev_cache_reset_stats", json!({"name":"c0"})), json!(true));
    let st = stats(&d);
    assert_eq!(st["counters"]["write_blocks"], json!(0), "{st}");
    assert_eq!(st["io"]["num_write_ops"], json!(0), "{st}");

    let (code, out, err) = cli(&d.socket, &["bdev_cache_detach", "--name", "c0", "--wait"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "true");
    assert!(err.contains("100.0%"), "progress: {err}");
    let st = stats(&d);
    assert_eq!((&st["state"], &st["dirty_blocks"]), (&json!("detached"), &json!(0)), "{st}");
    assert_eq!(d.ok("bdev_cache_get_bdevs", json!({"name":"c0"}))[0]["state"], json!("detached"));
    let fs = d.ok("bdev_cache_flush_status", json!({"name":"c0"}));
    assert_eq!((&fs["done"], &fs["operation"]), (&json!(true), &json!("detach")), "{fs}");
    // Served from the backing device alone now: the data written back is all there.
    assert_eq!(bad_blocks(&sock, 0, 512, 1), 0);
    write_blocks(&sock, 100, 50, 2);
    assert_eq!(bad_blocks(&sock, 100, 50, 2), 0);
    assert_eq!(stats(&d)["counters"]["write_blocks"], json!(0), "no write went through the cache");
    assert_eq!(d.ok("bdev_cache_detach", json!({"name":"c0"})), json!(true), "detach again is a no-op");
    d.err("bdev_cache_detach", json!({"name":"nope"}), ENODEV);
    d.err("bdev_cache_detach", json!({"name":"hdd1"}), ENODEV);

    // Re-attach: refused while exported, to another cache, or with format.
    let e = d.err("bdev_cache_attach", json!({"name":"c0","cache_bdev_name":"ssd0"}), EBUSY);
    assert!(e.contains("exported"), "{e}");
    d.err("bdev_cache_attach", json!({"name":"c0","cache_bdev_name":"hdd1"}), EOPNOTSUPP);
    d.err("bdev_cache_attach", json!({"name":"c0","cache_bdev_name":"ssd0","format":true}), EBUSY);
    d.err("bdev_cache_attach", json!({"name":"nope","cache_bdev_name":"ssd0"}), ENODEV);
    d.err("bdev_cache_attach", json!({"name":"c0","cache_bdev_name":"zz"}), ENODEV);
    let uuid_before = d.ok("bdev_cache_get_bdevs", json!({"name":"c0"}))[0]["backing_uuid"].clone();
    d.ok("nbd_export_remove", json!({"export_name":"c0"}));
    assert_eq!(d.ok("bdev_cache_attach", json!({"name":"c0","cache_bdev_name":"ssd0"})), json!(true));
    let l = d.ok("bdev_cache_get_bdevs", json!({"name":"c0"}));
    assert_eq!((&l[0]["state"], &l[0]["mode"]), (&json!("running"), &json!("writeback")), "{l}");
    assert_ne!(l[0]["backing_uuid"], uuid_before, "a fresh backing device");
    d.err("bdev_cache_attach", json!({"name":"c0","cache_bdev_name":"ssd0"}), -libc::EALREADY);
    d.ok("nbd_export_add", json!({"bdev_name":"c0"}));
    assert_eq!(bad_blocks(&sock, 0, 100, 1), 0);
    assert_eq!(bad_blocks(&sock, 100, 50, 2), 0);
    assert_eq!(bad_blocks(&sock, 150, 362, 1), 0);
    write_blocks(&sock, 600, 64, 3);
    let st = stats(&d);
    assert!(st["counters"]["write_blocks"].as_u64().unwrap() >= 64, "cached again: {st}");
    assert!(st["dirty_blocks"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(bad_blocks(&sock, 600, 64, 3), 0);
}

#[test]
fn export_of_a_stopped_cached_bdev_is_torn_down() {
    let dir = TempDir::new("cache-dead");
    let cfg = write_file(dir.path(), "c.json", MALLOC);
    let d = Daemon::start(dir.path(), "dead", &["--config", cfg.to_str().unwrap()]);
    let sock = dir.join("nbd.sock");
    d.ok("bdev_error_create", json!({"base_name":"hdd0"}));
    d.ok(
        "bdev_cache_create",
        json!({"name":"c0","mode":"wt","cache_bdev_name":"ssd0","core_bdev_name":"EE_hdd0","format":true}),
    );
    d.ok("bdev_cache_set_options", json!({"name":"c0","backing_offline_grace_ms":300}));
    d.ok("nbd_server_start", json!({"listen": format!("unix:{}", sock.display())}));
    d.ok("nbd_export_add", json!({"bdev_name":"c0"}));

    // The client reads fine, waits for "go", then reads blocks the cache does not hold
    // until the server disconnects it.
    let script = r#"
import nbd, sys, time, json
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pread(4096, 0)
print("ready", flush=True)
sys.stdin.readline()
errors, ok, dead = 0, 0, False
deadline = time.time() + 30
b = 1
while time.time() < deadline:
    try:
        h.pread(4096, (b % 30000) * 4096); ok += 1
    except nbd.Error as e:
        if h.aio_is_dead() or h.aio_is_closed() or not h.aio_is_ready():
            dead = True
            break
        errors += 1
    b += 1
print(json.dumps({"errors": errors, "ok_after_offline": ok, "disconnected": dead}), flush=True)
"#;
    let mut child = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(uri(&sock, "c0"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "client did not start");
    d.ok("bdev_error_inject_error", json!({"name":"EE_hdd0","offline":true}));
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "client failed");
    let r: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("client said {line:?}: {e}"));
    assert!(r["errors"].as_u64().unwrap() > 0, "the client saw errors first: {r}");
    assert_eq!(r["disconnected"], json!(true), "then a disconnect: {r}");
    assert_eq!(d.ok("bdev_cache_get_bdevs", json!({"name":"c0"}))[0]["state"], json!("stopped"));
    // The watcher drops its record right after the disconnect.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while d.ok("nbd_get_exports", Value::Null) != json!([]) {
        assert!(std::time::Instant::now() < deadline, "export still listed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.stderr_text().contains("is stopped (dead)"), "logged");
    // The dead bdev can still be deleted.
    d.ok("bdev_cache_delete", json!({"name":"c0"}));
}
