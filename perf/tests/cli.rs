//! The command line: bad input is a clear usage error (exit 2, never a panic), and --json
//! prints one document with every field.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tiercache_perf::{parse_args, run_cli, Mode};

fn cli(args: &[&str]) -> (i32, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut argv = vec!["tiercache-perf"];
    argv.extend_from_slice(args);
    let code = run_cli(argv, &mut out, &mut err, Arc::new(AtomicBool::new(false)));
    (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
}

#[test]
fn bad_command_lines_are_rejected_with_a_clear_error() {
    let cases: &[(&[&str], &str)] = &[
        (&["--null", "1G", "-o", "4x"], "bad size \"4x\""),
        (&["--null", "1G", "-o", "0"], "greater than zero"),
        (&["--null", "1G", "-o", "1000"], "multiple of 512"),
        (&["--null", "1G", "-o", "64M"], "at most"),
        (&["--null", "lots"], "bad size"),
        (&["--null", "1G", "-w", "bogus"], "invalid value 'bogus'"),
        (&["--null", "1G", "-w", "randread", "-M", "101"], "101"),
        (&["--null", "1G", "-q", "0"], "0"),
        (&["--null", "1G", "-t", "-1"], "-1"),
        (&["--null", "1G", "-t", "abc"], "bad duration"),
        (&["--null", "1G", "--io-count", "0"], "0"),
        (&["--null", "1G", "-t", "5", "--io-count", "10"], "cannot be used with"),
        (&["--null", "1G", "--block-size", "1024"], "512 or 4096"),
        (&["--null", "1000", "--block-size", "512"], "not a multiple of the block size"),
        (&["--null", "1G", "--malloc", "1G"], "cannot be used with"),
        (&["-w", "randread"], "a target is required"),
        (&["--null", "1G", "--cores", "1,1"], "listed twice"),
        (&["--null", "1G", "--cores", "x"], "bad --cores"),
        (&["--null", "1G", "--cores", "100000"], "does not exist"),
        (&["--null", "1G", "-w", "read", "--zipf", "1.1"], "--zipf applies to random workloads"),
        (&["--null", "1G", "-w", "randread", "--zipf", "0"], "bad zipf theta"),
        (&["--null", "1G", "--frobnicate"], "unexpected argument"),
    ];
    for (args, needle) in cases {
        let (code, out, err) = cli(args);
        assert_eq!(code, 2, "{args:?}: exit {code}, out {out:?} err {err:?}");
        assert!(err.contains(needle), "{args:?}: error {err:?} lacks {needle:?}");
        assert!(err.starts_with("error:"), "{args:?}: {err:?}");
        assert!(out.is_empty());
    }
    // Valid values are listed for a bad workload.
    let (_, _, err) = cli(&["--null", "1G", "-w", "bogus"]);
    assert!(err.contains("randrw") && err.contains("verify"), "{err}");
}

#[test]
fn geometry_errors_are_reported_not_panicked() {
    // 8 KiB device with 4 KiB blocks: a 16 KiB I/O does not fit.
    let (code, _, err) = cli(&["--malloc", "8k", "-o", "16k", "--io-count", "1", "--no-progress"]);
    assert_eq!(code, 1);
    assert!(err.contains("target too small"), "{err}");
    // 512-byte I/O on a 4 KiB-block device.
    let (code, _, err) = cli(&["--malloc", "1M", "-o", "512", "--io-count", "1", "--no-progress"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a multiple of the target's block size"), "{err}");
    // A file that does not exist.
    let (code, _, err) = cli(&["--uring", "/nonexistent/dir/file", "--io-count", "1", "--no-progress"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/dir/file"), "{err}");
}

#[test]
fn defaults_and_help() {
    let Mode::Run(o) = parse_args(["tiercache-perf", "--null", "1G"]).unwrap() else { panic!("run mode") };
    assert!(o.busy_poll && o.progress && !o.json);
    assert_eq!(o.cores, vec![0]);
    assert_eq!(o.job.io_size, 4096);
    let Mode::Run(o) =
        parse_args(["tiercache-perf", "--null", "1G", "--json", "--no-busy-poll", "-o", "128K"]).unwrap()
    else {
        panic!("run mode")
    };
    assert!(!o.busy_poll && !o.progress && o.json);
    assert_eq!(o.job.io_size, 128 << 10);
    let (code, out, _) = cli(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--queue-depth") && out.contains("--zipf"));
}

#[test]
fn json_output_parses_and_has_every_field() {
    let (code, out, err) = cli(&[
        "--malloc",
        "8M",
        "-w",
        "randrw",
        "-M",
        "70",
        "-o",
        "4k",
        "-q",
        "4",
        "--io-count",
        "3000",
        "--cores",
        "0",
        "--seed",
        "9",
        "--flush-every",
        "500",
        "--zipf",
        "0.9",
        "--json",
        "--histogram",
    ]);
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("stdout is exactly one JSON document");
    for k in [
        "tool",
        "version",
        "config",
        "target",
        "elapsed_s",
        "cores",
        "total",
        "flush",
        "verify",
        "io_errors",
        "histogram",
        "ok",
    ] {
        assert!(doc.get(k).is_some(), "missing {k}");
    }
    let cfg = &doc["config"];
    for k in [
        "workload",
        "read_pct",
        "io_size",
        "queue_depth",
        "cores",
        "time_s",
        "io_count",
        "flush_every",
        "zipf_theta",
        "seed",
        "busy_poll",
        "verify_pass",
    ] {
        assert!(cfg.get(k).is_some(), "config lacks {k}");
    }
    assert_eq!(cfg["seed"], 9);
    assert_eq!(cfg["workload"], "randrw");
    let lat_keys = ["avg", "min", "max", "p50", "p90", "p99", "p99_9", "p99_99", "p100"];
    let core_keys = [
        "reactor",
        "core",
        "elapsed_s",
        "ios",
        "reads",
        "writes",
        "flushes",
        "errors",
        "bytes",
        "iops",
        "mib_s",
        "latency_us",
    ];
    let cores = doc["cores"].as_array().unwrap();
    assert_eq!(cores.len(), 1);
    for c in cores.iter().chain(std::iter::once(&doc["total"])) {
        for k in core_keys {
            assert!(c.get(k).is_some(), "core entry lacks {k}: {c}");
        }
        for k in lat_keys {
            assert!(c["latency_us"][k].is_number(), "latency lacks {k}");
        }
    }
    assert_eq!(doc["ok"], true, "verify through the config's delay bdev found mismatches: {out}");
    assert_eq!(doc["cores"][0]["core"], 0);
    assert_eq!(doc["flush"]["count"].as_u64().unwrap(), doc["total"]["writes"].as_u64().unwrap() / 500);
    let hist = doc["histogram"].as_array().unwrap();
    assert!(!hist.is_empty());
    assert_eq!(hist.iter().map(|b| b["count"].as_u64().unwrap()).sum::<u64>(), 3000);
    assert!((hist.last().unwrap()["cumulative_pct"].as_f64().unwrap() - 100.0).abs() < 1e-6);
    assert_eq!(doc["ok"], true);
}

#[test]
fn text_output_has_the_table_and_the_seed() {
    let (code, out, err) =
        cli(&["--null", "64M", "-w", "randread", "-q", "2", "--io-count", "1000", "--cores", "0", "--no-progress"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("seed ") && out.contains("drawn"), "{out}");
    for col in [
        "IOPS", "MiB/s", "avg_us", "min_us", "max_us", "p50", "p90", "p99", "p99.9", "p99.99", "p100", "core 0",
        "total",
    ] {
        assert!(out.contains(col), "no {col} in {out}");
    }
}

#[test]
fn targets_come_from_a_json_config_too() {
    let dir = std::env::temp_dir().join(format!("tc-perf-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bdevs.json");
    std::fs::write(
        &cfg,
        r#"{"subsystems":[{"subsystem":"bdev","config":[
            {"method":"bdev_malloc_create","params":{"name":"m0","num_blocks":16384,"block_size":4096}},
            {"method":"bdev_delay_create","params":{"base_bdev_name":"m0","name":"d0","avg_read_latency":10,
              "p99_read_latency":20,"avg_write_latency":10,"p99_write_latency":20}},
            {"method":"bdev_null_create","params":{"name":"n0","num_blocks":1024,"block_size":4096}}]}]}"#,
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    // --bdev picks one of them; data round-trips through the delay bdev over malloc.
    let (code, out, err) =
        cli(&["--config", c, "--bdev", "d0", "-w", "verify", "-q", "4", "--io-count", "512", "--json"]);
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["target"]["name"], "d0", "{out}");
    assert_eq!(doc["ok"], serde_json::json!(true), "verify through the config's delay bdev found mismatches: {out}");
    // Default: the last bdev the config creates.
    let (code, out, _) = cli(&["--config", c, "-w", "randread", "--io-count", "100", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["target"]["name"], "n0");
    // Errors name the problem.
    let (code, _, err) = cli(&["--config", c, "--bdev", "nope", "--io-count", "10"]);
    assert_ne!(code, 0);
    assert!(err.contains("no bdev named \"nope\""), "{err}");
    std::fs::write(&cfg, r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_delay_create","params":{"name":"x","base_bdev_name":"missing"}}]}]}"#).unwrap();
    let (code, _, err) = cli(&["--config", c, "--io-count", "10"]);
    assert_ne!(code, 0);
    assert!(err.contains("entry #0") && err.contains("unknown base bdev"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}
