//! The cached target (`--cache`/`--backing`) on files in a temp directory on the real disk
//! (O_DIRECT): verify finds no mismatch, the data survives a reload, and the JSON carries
//! the cache counters.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tiercache_perf::run_cli;

fn cli(args: &[&str]) -> (i32, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut argv = vec!["tiercache-perf"];
    argv.extend_from_slice(args);
    let code = run_cli(argv, &mut out, &mut err, Arc::new(AtomicBool::new(false)));
    (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
}

/// A fresh directory under the system temp dir (ext4 here, not tmpfs), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("tiercache-perf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A sparse file of `bytes`.
    fn file(&self, name: &str, bytes: u64) -> String {
        let p = self.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
        p.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("stdout is one JSON document")
}

#[test]
fn cached_verify_run_finds_no_mismatch_and_survives_a_reload() {
    let dir = TempDir::new("verify");
    let cache = dir.file("cache.dat", 64 << 20);
    let backing = dir.file("backing.dat", 64 << 20);
    // 128 KiB segments: 512 of them (6000 blocks stay below the writeback watermark); a 200 µs delay on the backing device.
    let common = [
        "--cache",
        cache.as_str(),
        "--backing",
        backing.as_str(),
        "--backing-delay-us",
        "200,1000",
        "-w",
        "verify",
        "-o",
        "8k",
        "-q",
        "8",
        "--cores",
        "0",
        "--seed",
        "42",
        "--json",
    ];
    let mut args = common.to_vec();
    // writeback_percent 100: the rate controller leaves the 38% dirty log alone, so every
    // block is still dirty (and in the log) after the run.
    args.extend(["--cache-format", "--segment-size", "128k", "--writeback-percent", "100", "--io-count", "6000"]);
    let (code, out, err) = cli(&args);
    assert_eq!(code, 0, "{err}");
    let doc = json(&out);
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["verify"]["mismatches"], 0);
    assert_eq!(doc["verify"]["blocks_checked"], 3000 * 2);
    let c = &doc["cache"];
    assert_eq!(c["opened_by"], "format");
    assert_eq!(c["segment_size"], 128 << 10);
    // Every read block was written just before: all hits.
    assert_eq!(c["counters"]["read_miss_blocks"], 0);
    assert_eq!(c["counters"]["read_hit_blocks"], 3000 * 2);
    assert!(c["counters"]["segments_written"].as_u64().unwrap() > 0);
    assert_eq!(c["dirty_blocks"].as_u64().unwrap(), 3000 * 2, "each block written once");
    assert_eq!(c["counters"]["writeback_blocks"], 0);

    // Write a pattern with another seed, reload the set (no --cache-format), read it back:
    // it must come from the replayed log (the final FLUSH made it durable).
    let mut w = common.to_vec();
    w[15] = "7";
    w.extend(["--verify-pass", "write", "--io-count", "2000"]);
    let (code, _, err) = cli(&w);
    assert_eq!(code, 0, "{err}");
    let mut r = common.to_vec();
    r[15] = "7";
    r.extend(["--verify-pass", "read", "--io-count", "2000"]);
    let (code, out, err) = cli(&r);
    assert_eq!(code, 0, "{err}");
    let doc = json(&out);
    assert_eq!(doc["cache"]["opened_by"], "load");
    assert_eq!(doc["verify"]["mismatches"], 0);
    assert_eq!(doc["verify"]["blocks_checked"], 2000 * 2);
    assert_eq!(doc["cache"]["counters"]["read_hit_blocks"], 2000 * 2);
}

#[test]
fn cached_json_has_the_cache_section() {
    let dir = TempDir::new("json");
    let cache = dir.file("cache.dat", 16 << 20);
    let backing = dir.file("backing.dat", 64 << 20);
    let (code, out, err) = cli(&[
        "--cache",
        &cache,
        "--backing",
        &backing,
        "--cache-format",
        "--segment-size",
        "128k",
        // The rate controller would start writeback above 10% dirty.
        "--writeback-percent",
        "100",
        "-w",
        "randrw",
        "-M",
        "50",
        "-q",
        "4",
        "--io-count",
        "4000",
        "--flush-every",
        "100",
        "--cores",
        "0",
        "--seed",
        "5",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let doc = json(&out);
    assert_eq!(doc["target"]["kind"], "cache");
    let c = &doc["cache"];
    for k in [
        "cache_file",
        "backing_file",
        "mode",
        "opened_by",
        "setup_s",
        "backing_delay_us",
        "block_size",
        "segment_size",
        "nr_segments",
        "counters",
        "free_segments",
        "dirty_blocks",
        "writeback_seq",
        "final_flush_ms",
        "index_ram",
    ] {
        assert!(c.get(k).is_some(), "cache section lacks {k}: {c}");
    }
    for k in [
        "read_hit_blocks",
        "read_miss_blocks",
        "hit_pct",
        "segments_written",
        "blocks_per_segment_write",
        "writeback_blocks",
        "cache_dev_read_blocks",
        "cache_dev",
        "backing_dev",
    ] {
        assert!(c["counters"].get(k).is_some(), "counters lack {k}");
    }
    assert_eq!(c["mode"], "writeback");
    assert!(c["backing_delay_us"].is_null());
    let k = &c["counters"];
    let reads = doc["total"]["reads"].as_u64().unwrap();
    assert_eq!(k["read_hit_blocks"].as_u64().unwrap() + k["read_miss_blocks"].as_u64().unwrap(), reads);
    // Random reads over a fresh volume mostly miss; no writeback in a run this small.
    assert!(k["read_miss_blocks"].as_u64().unwrap() > 0);
    assert_eq!(k["writeback_blocks"], 0);
    // Each FLUSH seals what is open: at least one segment per FLUSH round.
    assert!(k["segments_written"].as_u64().unwrap() >= doc["flush"]["count"].as_u64().unwrap() / 4);
    // FLUSH group commit: FLUSHes that arrive during a round share the next one, so the cache
    // device sees between one and one flush per FLUSH.
    let dev_flushes = k["cache_dev"]["flushes"].as_u64().unwrap();
    assert!(dev_flushes >= 1 && dev_flushes <= doc["flush"]["count"].as_u64().unwrap(), "{dev_flushes}");
    let ram = &c["index_ram"];
    assert!(ram["bytes_per_slot"].as_f64().unwrap() > 0.0);
    assert_eq!(ram["bytes_per_slot"], ram["bytes_per_cached_4k"]);
}

#[test]
fn cached_command_line_errors() {
    let dir = TempDir::new("cli");
    let cache = dir.file("cache.dat", 16 << 20);
    let backing = dir.file("backing.dat", 64 << 20);
    let cases: Vec<(Vec<&str>, &str, i32)> = vec![
        (vec!["--cache", &cache], "--backing", 2),
        (vec!["--backing", &backing, "--null", "1G"], "--cache", 2),
        (vec!["--cache", &cache, "--backing", &backing, "--cache-format", "--segment-size", "100k"], "power of two", 2),
        (vec!["--cache", &cache, "--backing", &backing, "--segment-size", "256k"], "--cache-format", 2),
        (vec!["--cache", &cache, "--backing", &backing, "--backing-delay-us", "9,x"], "bad backing delay", 2),
        (vec!["--cache", &cache, "--backing", &backing, "--backing-delay-us", "900,10"], "P99", 2),
        (vec!["--cache", &cache, "--backing", &backing, "--cache-mode", "fast"], "bad cache mode", 2),
        // Not formatted: load refuses, and says how to create one.
        (vec!["--cache", &cache, "--backing", &backing, "--io-count", "1"], "--cache-format", 1),
    ];
    for (args, needle, want) in cases {
        let mut a = args.clone();
        a.push("--no-progress");
        let (code, _, err) = cli(&a);
        assert_eq!(code, want, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    }
}

#[test]
fn trace_replay_reports_engine_and_lru_hit_ratios() {
    let dir = TempDir::new("trace");
    let cache = dir.file("cache.dat", 16 << 20);
    let backing = dir.file("backing.dat", 32 << 20);
    let trace = dir.0.join("t.txt").display().to_string();
    let gen = [
        "--gen-trace",
        trace.as_str(),
        "--trace-blocks",
        "4096",
        "--trace-accesses",
        "20000",
        "--trace-scan-every",
        "10000",
        "--zipf",
        "0.9",
        "--seed",
        "5",
    ];
    let (code, out, err) = cli(&gen);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("28192 entries"), "{out}");
    let first = std::fs::read_to_string(&trace).unwrap();
    assert_eq!(cli(&gen).0, 0);
    assert_eq!(std::fs::read_to_string(&trace).unwrap(), first, "same seed, same trace");

    let (code, out, err) = cli(&[
        "--cache",
        cache.as_str(),
        "--backing",
        backing.as_str(),
        "--cache-format",
        "--segment-size",
        "128k",
        "--writeback-low-pct",
        "5",
        "-w",
        "randread",
        "-q",
        "4",
        "--trace",
        trace.as_str(),
        "--lru-sim",
        "400",
        "--cores",
        "0",
        "--seed",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let doc = json(&out);
    assert_eq!(doc["total"]["reads"], 28192);
    assert_eq!(doc["trace"]["entries"], 28192);
    let lru = &doc["trace"]["lru"];
    assert_eq!(lru["capacity_blocks"], 400);
    assert_eq!(lru["hits"].as_u64().unwrap() + lru["misses"].as_u64().unwrap(), 28192);
    let e = &doc["cache"]["engine"];
    let reads = ["read_hits", "read_partial_hits", "read_misses"].iter().map(|k| e[*k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(reads, 28192);
    assert!(e["promotions"].as_u64().unwrap() > 0, "{e}");
    assert!(e["read_hits"].as_u64().unwrap() > 0, "{e}");
    assert!(doc["cache"]["engine_hit_pct"].as_f64().is_some());
    assert!(doc["cache"]["cached_blocks"].as_u64().unwrap() > 0);

    // A trace naming a slot beyond the device is refused before any I/O.
    std::fs::write(&trace, "1\n99999999\n").unwrap();
    let (code, _, err) = cli(&[
        "--cache",
        cache.as_str(),
        "--backing",
        backing.as_str(),
        "-w",
        "randread",
        "--trace",
        trace.as_str(),
        "--cores",
        "0",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("trace names I/O slot 99999999"), "{err}");
    // --trace wants a random workload, --lru-sim wants --trace.
    assert_eq!(cli(&["--null", "1M", "-w", "read", "--trace", trace.as_str()]).0, 2);
    assert_eq!(cli(&["--null", "1M", "--lru-sim", "10"]).0, 2);
}

#[test]
fn drain_after_the_job_writes_every_dirty_block_back() {
    let dir = TempDir::new("drain");
    let cache = dir.file("cache.dat", 32 << 20);
    let backing = dir.file("backing.dat", 64 << 20);
    let (code, out, err) = cli(&[
        "--cache",
        cache.as_str(),
        "--backing",
        backing.as_str(),
        "--cache-format",
        "--segment-size",
        "128k",
        "--seq-cutoff",
        "0",
        "-w",
        "randwrite",
        "-q",
        "8",
        "--io-count",
        "3000",
        "--drain",
        "--cores",
        "0",
        "--seed",
        "9",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let doc = json(&out);
    let d = &doc["cache"]["drain"];
    assert_eq!(d["when"], "after");
    let before = d["dirty_blocks_before"].as_u64().unwrap();
    assert!(before > 2000 && before <= 3000, "{d}");
    assert_eq!(d["dirty_blocks_after"], 0);
    assert_eq!(d["written_back_blocks"].as_u64().unwrap(), before, "{d}");
    assert!(d["mib_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(doc["cache"]["dirty_blocks"], 0);
}

#[test]
fn prefill_runs_unmeasured_before_the_job_in_the_same_process() {
    // A RAM cache starts empty in every process: the prefill is the only way to measure a
    // job against a cache that already holds data.
    let dir = TempDir::new("prefill");
    let backing = dir.file("backing.dat", 64 << 20);
    let (code, out, err) = cli(&[
        "--cache",
        "malloc:32M",
        "--backing",
        backing.as_str(),
        "--cache-format",
        "--segment-size",
        "128k",
        "--seq-cutoff",
        "0",
        "--writeback-percent",
        "100",
        "--dirty-cutoff-pct",
        "100",
        "-w",
        "randwrite",
        "-q",
        "4",
        "--io-count",
        "1000",
        "--prefill-ios",
        "2000",
        "--cores",
        "0",
        "--seed",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let doc = json(&out);
    assert_eq!(doc["total"]["writes"], 1000, "the report covers the measured job only");
    let c = &doc["cache"];
    assert_eq!(c["engine"]["write_blocks"], 1000, "engine counters are the measured job's: {}", c["engine"]);
    // The prefill's writes are in the cache: 3,000 random writes over 16,384 blocks leave
    // about 2,750 distinct dirty blocks (no writeback: writeback_percent 100, room left).
    let dirty = c["dirty_blocks"].as_u64().unwrap();
    assert!(dirty > 2000 && dirty <= 3000, "dirty blocks {dirty}: the prefill did not write into the cache");
    // Bad values are refused.
    let (code, _, err) =
        cli(&["--cache", "malloc:32M", "--backing", backing.as_str(), "--prefill-ios", "0", "-t", "1"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&["--malloc", "32M", "--prefill-ios", "10", "-t", "1"]);
    assert_eq!(code, 2, "{err}");
}
