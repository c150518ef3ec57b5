//! `tiercache serve` with the built-in default configuration: files in the data dir, the
//! cached bdev exported over NBD, data surviving SIGTERM + restart through log replay (not
//! a reformat), NBD I/O served while RPCs run, and a save_config round trip.

mod rpc_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rpc_support::{have, write_file, Daemon, TempDir};
use serde_json::{json, Value};

/// `tiercache serve --data-dir DATA` with the NBD socket in DATA and a free TCP port.
fn start_default(dir: &TempDir, data: &Path, tag: &str) -> Daemon {
    let unix = format!("unix:{}", data.join("nbd.sock").display());
    Daemon::start(
        dir.path(),
        tag,
        &["--data-dir", data.to_str().unwrap(), "--nbd-listen", &unix, "--nbd-listen", "127.0.0.1:0"],
    )
}

/// Runs qemu-io commands on the export (nbdsh when qemu-io is absent); Err(output) on a
/// failed command or pattern mismatch.
fn nbd_io(sock: &Path, cmds: &[(&str, u8, u64, u64)]) -> Result<(), String> {
    if have("qemu-io") {
        let uri = format!("nbd+unix:///cache0?socket={}", sock.display());
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for (op, pat, off, len) in cmds {
            c.arg("-c").arg(format!("{op} -P {pat:#04x} {off} {len}"));
        }
        if cmds.iter().any(|c| c.0 == "write") {
            c.arg("-c").arg("flush");
        }
        let out = c.arg(uri).output().map_err(|e| format!("qemu-io: {e}"))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() || text.contains("failed") || text.contains("error") {
            return Err(text);
        }
        return Ok(());
    }
    assert!(have("nbdsh"), "qemu-io or nbdsh is needed (scripts/test.sh installs them)");
    let mut py = String::new();
    for (op, pat, off, len) in cmds {
        if *op == "write" {
            py += &format!("h.pwrite(bytes([{pat}]) * {len}, {off})\n");
        } else {
            py += &format!("assert h.pread({len}, {off}) == bytes([{pat}]) * {len}, 'pattern mismatch at {off}'\n");
        }
    }
    py += "h.flush()\n";
    let out = Command::new("nbdsh")
        .args(["-u", &format!("nbd+unix:///cache0?socket={}", sock.display()), "-c", &py])
        .output()
        .map_err(|e| format!("nbdsh: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(())
}

const IO: &[(&str, u8, u64, u64)] =
    &[("write", 0xab, 0, 1 << 20), ("write", 0x5c, 4 << 20, 65536), ("write", 0x11, 512 << 20, 8192)];
const VERIFY: &[(&str, u8, u64, u64)] =
    &[("read", 0xab, 0, 1 << 20), ("read", 0x5c, 4 << 20, 65536), ("read", 0x11, 512 << 20, 8192)];

#[test]
fn default_config_survives_restart_and_round_trips() {
    let dir = TempDir::new("daemon-default");
    let data = dir.join("data");
    let mut d = start_default(&dir, &data, "first");
    assert_eq!(std::fs::metadata(data.join("backing.img")).unwrap().len(), 1 << 30);
    assert_eq!(std::fs::metadata(data.join("cache.img")).unwrap().len(), 256 << 20);
    let banner = d.stdout_text();
    assert!(banner.contains("nbdinfo") && banner.contains("qemu-io") && banner.contains("nbdfuse"), "{banner}");
    let bdevs = d.ok("bdev_cache_get_bdevs", Value::Null);
    assert_eq!((bdevs[0]["name"].clone(), bdevs[0]["origin"].clone()), (json!("cache0"), json!("formatted")));
    let ex = d.ok("nbd_get_exports", Value::Null);
    assert_eq!(ex[0]["export_name"], json!("cache0"));

    // NBD I/O while a second thread keeps calling RPCs.
    let sock = data.join("nbd.sock");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rpcs = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut n = 0u32;
            let mut c = d.client();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.call("bdev_get_iostat", Some(json!({"name": "cache0"}))).expect("iostat during I/O");
                c.call("bdev_cache_get_stats", Some(json!({"name": "cache0"}))).expect("stats during I/O");
                n += 1;
            }
            n
        });
        let r = nbd_io(&sock, IO);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r.expect("write over NBD");
        h.join().expect("rpc thread")
    });
    assert!(rpcs > 0);
    let io = d.ok("bdev_get_iostat", json!({"name": "cache0"}));
    assert!(io["bdevs"][0]["bytes_written"].as_u64().unwrap() >= (1 << 20) + 65536 + 8192, "{io}");
    let st = d.ok("bdev_cache_get_stats", json!({"name": "cache0"}));
    assert!(st["cache_set"]["live_blocks"].as_u64().unwrap() > 0, "{st}");

    let status = d.terminate();
    assert!(status.success(), "exit status {status}; stderr:\n{}", d.stderr_text());
    let log1 = d.stderr_text();
    for step in ["shutdown: NBD server stopped", "shutdown: flushed cache0", "migration stopped", "shutdown complete"] {
        assert!(log1.contains(step), "missing \"{step}\" in:\n{log1}");
    }
    let order: Vec<usize> = [
        "shutdown: NBD server stopped",
        "shutdown: flushed cache0",
        "migration stopped",
        "RPC server stopped",
        "reactors stopped",
    ]
    .iter()
    .map(|s| log1.find(s).unwrap_or(usize::MAX))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "shutdown order {order:?}:\n{log1}");

    // Restart: the cache is loaded (log replay), never reformatted, and the data is back.
    let d2 = start_default(&dir, &data, "second");
    let log2 = d2.stderr_text();
    assert!(log2.contains("recovered") && !log2.contains("formatted"), "expected log replay:\n{log2}");
    let b = d2.ok("bdev_cache_get_bdevs", Value::Null);
    assert_eq!(b[0]["origin"], json!("loaded"));
    assert_eq!(b[0]["cache_set_uuid"], bdevs[0]["cache_set_uuid"], "same cache set, not a new format");
    nbd_io(&sock, VERIFY).expect("data written before the restart reads back");

    // save_config round trip: a fresh daemon replaying the saved document saves the same one.
    let saved = d2.ok("save_config", Value::Null);
    let methods: Vec<&str> =
        saved["subsystems"][0]["config"].as_array().unwrap().iter().map(|e| e["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["bdev_uring_create", "bdev_uring_create", "bdev_cache_create"]);
    assert!(saved["subsystems"][0]["config"][2]["params"].get("format").is_none(), "never format on replay");
    drop(d2);
    let cfg = write_file(dir.path(), "saved.json", &serde_json::to_string_pretty(&saved).unwrap());
    let d3 = Daemon::start(dir.path(), "third", &["--config", cfg.to_str().unwrap()]);
    let again = d3.ok("save_config", Value::Null);
    assert_eq!(again, saved);
    nbd_io(&sock, VERIFY).expect("data still there after the replayed config");
}

#[test]
fn config_errors_name_the_entry() {
    let dir = TempDir::new("daemon-badcfg");
    let cfg = write_file(
        dir.path(),
        "bad.json",
        r#"{"subsystems":[{"subsystem":"bdev","config":[
            {"method":"bdev_malloc_create","params":{"name":"m0","num_blocks":64,"block_size":512}},
            {"method":"bdev_cache_create","params":{"name":"c0","mode":"wb","cache_bdev_name":"m0","core_bdev_name":"nope"}}]}]}"#,
    );
    let t0 = Instant::now();
    let out = Command::new(rpc_support::BIN)
        .args(["serve", "--cores", "0", "--config", cfg.to_str().unwrap(), "--rpc-socket"])
        .arg(dir.join("r.sock"))
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    assert!(t0.elapsed() < Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("entry #1 (bdev_cache_create)") && err.contains("nope"), "{err}");
    assert!(!dir.join("r.sock").exists(), "no RPC socket left behind");
}
