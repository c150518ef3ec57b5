//! Every RPC method against a running daemon: happy path and bad input, two clients at
//! once, the `tiercache rpc` CLI, and a raw Python client proving the wire format.

mod rpc_support;

use std::time::{Duration, Instant};

use rpc_support::{cli, write_file, Daemon, TempDir};
use serde_json::{json, Value};

const INVALID_PARAMS: i32 = -32602;
const METHOD_NOT_FOUND: i32 = -32601;
const EEXIST: i32 = -17;
const ENODEV: i32 = -19;
const EBUSY: i32 = -16;
const ENOENT: i32 = -2;
const EOPNOTSUPP: i32 = -95;

const CONFIG: &str = r#"{"subsystems":[
  {"subsystem":"bdev","config":[
    {"method":"bdev_malloc_create","params":{"name":"ssd0","num_blocks":16384,"block_size":4096}},
    {"method":"bdev_malloc_create","params":{"name":"hdd0","num_blocks":32768,"block_size":4096}},
    {"method":"bdev_malloc_create","params":{"name":"hdd1","num_blocks":32768,"block_size":4096}},
    {"method":"bdev_null_create","params":{"name":"null0","num_blocks":1024,"block_size":512}}]},
  {"subsystem":"nbd","config":[]}]}"#;

fn start(dir: &TempDir, tag: &str) -> Daemon {
    let cfg = write_file(dir.path(), &format!("{tag}.json"), CONFIG);
    Daemon::start(dir.path(), tag, &["--config", cfg.to_str().expect("utf-8 path")])
}

fn names(v: &Value) -> Vec<String> {
    v.as_array().expect("array").iter().map(|b| b["name"].as_str().unwrap_or("").to_string()).collect()
}

#[test]
fn framework_methods_and_protocol_errors() {
    let dir = TempDir::new("rpc-fw");
    let d = start(&dir, "fw");
    let methods: Vec<String> = serde_json::from_value(d.ok("rpc_get_methods", Value::Null)).unwrap();
    for (m, _) in tiercache_jsonrpc::schema::METHODS {
        assert!(methods.iter().any(|x| x == m), "rpc_get_methods lacks {m}");
    }
    d.ok("rpc_get_methods", json!({"current": true, "include_aliases": false}));
    let v = d.ok("tiercache_get_version", Value::Null);
    assert!(v["version"].as_str().unwrap().starts_with("tiercache v"));
    assert_eq!(v["fields"]["major"], json!(0));

    let e = d.err("no_such_method", Value::Null, METHOD_NOT_FOUND);
    assert!(e.contains("no_such_method"), "{e}");
    let e = d.err("tiercache_get_version", json!({"x": 1}), INVALID_PARAMS);
    assert!(e.contains("unknown field \"x\""), "{e}");

    let r = d.ok("framework_get_reactors", Value::Null);
    assert_eq!(r["tick_rate"], json!(1_000_000_000u64));
    let reactors = r["reactors"].as_array().unwrap();
    assert_eq!(reactors.len(), 1);
    assert_eq!(reactors[0]["lcore"], json!(0));
    assert!(reactors[0]["busy"].is_u64() && reactors[0]["idle"].is_u64());

    let subs = d.ok("framework_get_subsystems", Value::Null);
    assert_eq!(subs, json!([{"subsystem":"bdev","depends_on":[]},{"subsystem":"nbd","depends_on":["bdev"]}]));
    let cfg = d.ok("framework_get_config", json!({"name": "bdev", "with_batches": false}));
    assert_eq!(names(&cfg.as_array().unwrap().iter().map(|e| e["params"].clone()).collect::<Value>()).len(), 4);
    d.err("framework_get_config", json!({"name": "zz"}), ENODEV);
    let e = d.err("framework_get_config", json!({}), INVALID_PARAMS);
    assert!(e.contains("missing field \"name\""), "{e}");
    let doc = d.ok("save_config", Value::Null);
    let parsed = tiercache_jsonrpc::config::ConfigDocument::from_value(&doc).expect("save_config is a valid document");
    assert_eq!(parsed.subsystems.len(), 2);
    assert_eq!(parsed.subsystems[0].config.len(), 4);
    let only = d.ok("save_config", json!({"subsystems": ["nbd"]}));
    assert_eq!(only["subsystems"].as_array().unwrap().len(), 1);
    d.err("save_config", json!({"subsystems": ["zz"]}), ENODEV);
}

#[test]
fn bdev_methods() {
    let dir = TempDir::new("rpc-bdev");
    let d = start(&dir, "bdev");

    // bdev_get_bdevs: SPDK's fields.
    let all = d.ok("bdev_get_bdevs", Value::Null);
    assert_eq!(names(&all), ["ssd0", "hdd0", "hdd1", "null0"]);
    let b = &d.ok("bdev_get_bdevs", json!({"name": "hdd0"}))[0];
    for k in ["name", "aliases", "product_name", "block_size", "num_blocks", "uuid", "claimed", "supported_io_types"] {
        assert!(b.get(k).is_some(), "bdev_get_bdevs lacks {k}: {b}");
    }
    assert_eq!((b["block_size"].as_u64(), b["num_blocks"].as_u64()), (Some(4096), Some(32768)));
    assert_eq!(b["claimed"], json!(false));
    assert_eq!(b["supported_io_types"]["read"], json!(true));
    assert!(b["driver_specific"]["malloc"].is_object());
    d.err("bdev_get_bdevs", json!({"name": "nope"}), ENODEV);
    let t0 = Instant::now();
    d.err("bdev_get_bdevs", json!({"name": "nope", "timeout": 150}), ENODEV);
    assert!(t0.elapsed() >= Duration::from_millis(150));
    let e = d.err("bdev_get_bdevs", json!({"timeout": 5}), INVALID_PARAMS);
    assert!(e.contains("timeout requires name"), "{e}");

    // malloc
    assert_eq!(d.ok("bdev_malloc_create", json!({"name":"m0","num_blocks":256,"block_size":512})), json!("m0"));
    let gen = d.ok("bdev_malloc_create", json!({"num_blocks":256,"block_size":512}));
    assert!(gen.as_str().unwrap().starts_with("Malloc"), "{gen}");
    let e = d.err("bdev_malloc_create", json!({"name":"m0","num_blocks":256,"block_size":512}), EEXIST);
    assert!(e.contains("m0") && e.contains("already exists"), "{e}");
    let e = d.err("bdev_malloc_create", json!({"nmae":"m9","num_blocks":256,"block_size":512}), INVALID_PARAMS);
    assert!(e.contains("unknown field \"nmae\""), "{e}");
    let e = d.err("bdev_malloc_create", json!({"name":"m9","block_size":512}), INVALID_PARAMS);
    assert!(e.contains("missing field \"num_blocks\""), "{e}");
    let e = d.err("bdev_malloc_create", json!({"name":"m9","num_blocks":"lots","block_size":512}), INVALID_PARAMS);
    assert!(e.contains("num_blocks"), "{e}");
    let e =
        d.err("bdev_malloc_create", json!({"name":"m9","num_blocks":8,"block_size":512,"md_size":8}), INVALID_PARAMS);
    assert!(e.contains("md_size"), "{e}");
    d.err("bdev_malloc_create", json!([1, 2]), INVALID_PARAMS);
    // a block size the schema allows but the backend does not
    d.err("bdev_malloc_create", json!({"name":"m9","num_blocks":8,"block_size":1024}), -22);
    assert_eq!(d.ok("bdev_malloc_delete", json!({"name": gen})), json!(true));
    d.err("bdev_malloc_delete", json!({"name": "nope"}), ENODEV);
    let e = d.err("bdev_null_delete", json!({"name": "m0"}), ENODEV);
    assert!(e.contains("not a null bdev"), "{e}");

    // null
    assert_eq!(d.ok("bdev_null_create", json!({"name":"n1","num_blocks":64,"block_size":4096})), json!("n1"));
    d.err("bdev_null_create", json!({"name":"n1","num_blocks":64,"block_size":4096}), EEXIST);
    d.err("bdev_null_create", json!({"num_blocks":64,"block_size":4096}), INVALID_PARAMS);
    assert_eq!(d.ok("bdev_null_delete", json!({"name": "n1"})), json!(true));

    // uring
    let img = dir.join("u.img");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let p = json!({"name":"u0","filename": img, "block_size": 4096});
    assert_eq!(d.ok("bdev_uring_create", p.clone()), json!("u0"));
    d.err("bdev_uring_create", p, EEXIST);
    let e = d.err("bdev_uring_create", json!({"name":"u1","filename": dir.join("missing.img")}), ENOENT);
    assert!(e.contains("u1"), "{e}");
    d.err("bdev_uring_create", json!({"name":"u1","filename": ""}), INVALID_PARAMS);
    assert_eq!(d.ok("bdev_uring_delete", json!({"name": "u0"})), json!(true));

    // error bdev: claims its base
    assert_eq!(d.ok("bdev_error_create", json!({"base_name": "m0"})), json!("EE_m0"));
    d.err("bdev_error_create", json!({"base_name": "m0"}), EEXIST);
    d.err("bdev_error_create", json!({"base_name": "nope"}), ENODEV);
    let e = d.err("bdev_malloc_delete", json!({"name": "m0"}), EBUSY);
    assert!(e.contains("claimed by EE_m0"), "{e}");
    assert_eq!(d.ok("bdev_get_bdevs", json!({"name": "m0"}))[0]["claimed"], json!(true));
    let inj = json!({"name":"EE_m0","io_type":"read","error_type":"failure","num":2});
    assert_eq!(d.ok("bdev_error_inject_error", inj), json!(true));
    d.ok("bdev_error_inject_error", json!({"name":"EE_m0","io_type":"write","error_type":"nomem","every_nth":3}));
    d.ok(
        "bdev_error_inject_error",
        json!({"name":"EE_m0","io_type":"all","error_type":"failure","probability":0.5,"seed":7}),
    );
    d.ok(
        "bdev_error_inject_error",
        json!({"name":"EE_m0","io_type":"read","error_type":"corrupt_data","corrupt_value":255}),
    );
    let e =
        d.err("bdev_error_inject_error", json!({"name":"EE_m0","io_type":"read","error_type":"pending"}), EOPNOTSUPP);
    assert!(e.contains("not supported"), "{e}");
    d.err(
        "bdev_error_inject_error",
        json!({"name":"EE_m0","io_type":"read","error_type":"corrupt_data","corrupt_value":1}),
        EOPNOTSUPP,
    );
    d.err("bdev_error_inject_error", json!({"name":"m0","io_type":"read","error_type":"failure"}), ENODEV);
    d.err("bdev_error_inject_error", json!({"name":"EE_m0","io_type":"read"}), INVALID_PARAMS);
    d.ok("bdev_error_inject_error", json!({"name":"EE_m0","offline":true}));
    assert_eq!(d.ok("bdev_get_bdevs", json!({"name":"EE_m0"}))[0]["driver_specific"]["error"]["offline"], json!(true));
    d.ok("bdev_error_inject_error", json!({"name":"EE_m0","io_type":"clear"}));
    d.ok("bdev_error_inject_error", json!({"name":"EE_m0","clear":true}));
    assert_eq!(d.ok("bdev_error_delete", json!({"name": "EE_m0"})), json!(true));
    d.err("bdev_error_delete", json!({"name": "EE_m0"}), ENODEV);

    // delay bdev
    let p = json!({"base_bdev_name":"m0","name":"dly0","avg_read_latency":10,"p99_read_latency":20,
                   "avg_write_latency":10,"p99_write_latency":20});
    assert_eq!(d.ok("bdev_delay_create", p.clone()), json!("dly0"));
    d.err("bdev_delay_create", p, EEXIST);
    let e = d.err(
        "bdev_delay_create",
        json!({"base_bdev_name":"m0","name":"dly1","avg_read_latency":10,"p99_read_latency":20,
                   "avg_write_latency":10,"p99_write_latency":20}),
        EBUSY,
    );
    assert!(e.contains("claimed by dly0"), "{e}");
    d.err(
        "bdev_delay_create",
        json!({"base_bdev_name":"m0","name":"dly1","avg_read_latency":30,"p99_read_latency":20,
                   "avg_write_latency":10,"p99_write_latency":20}),
        INVALID_PARAMS,
    );
    assert_eq!(
        d.ok("bdev_delay_update_latency", json!({"delay_bdev_name":"dly0","latency_type":"avg_read","latency_us":50})),
        json!(true)
    );
    d.err(
        "bdev_delay_update_latency",
        json!({"delay_bdev_name":"m0","latency_type":"avg_read","latency_us":5}),
        ENODEV,
    );
    d.err(
        "bdev_delay_update_latency",
        json!({"delay_bdev_name":"dly0","latency_type":"p50","latency_us":5}),
        INVALID_PARAMS,
    );
    // the saved config replays although avg_read (50) is now above p99_read (20)
    let doc = d.ok("save_config", Value::Null);
    tiercache_jsonrpc::config::ConfigDocument::from_value(&doc).expect("valid after update_latency");
    d.err("bdev_malloc_delete", json!({"name": "m0"}), EBUSY);
    assert_eq!(d.ok("bdev_delay_delete", json!({"name": "dly0"})), json!(true));
    assert_eq!(d.ok("bdev_malloc_delete", json!({"name": "m0"})), json!(true));

    // iostat
    let st = d.ok("bdev_get_iostat", Value::Null);
    assert_eq!(st["tick_rate"], json!(1_000_000_000u64));
    assert!(st["ticks"].as_u64().unwrap() > 0);
    assert_eq!(names(&st["bdevs"]).len(), 4);
    for k in ["bytes_read", "num_read_ops", "bytes_written", "num_write_ops", "bytes_unmapped", "num_unmap_ops"] {
        assert!(st["bdevs"][0][k].is_u64(), "{k}");
    }
    assert_eq!(names(&d.ok("bdev_get_iostat", json!({"name": "hdd1"}))["bdevs"]), ["hdd1"]);
    d.ok("bdev_get_iostat", json!({"per_channel": false}));
    d.err("bdev_get_iostat", json!({"per_channel": true}), EOPNOTSUPP);
    d.err("bdev_get_iostat", json!({"name": "nope"}), ENODEV);
}

#[test]
fn cache_methods() {
    let dir = TempDir::new("rpc-cache");
    let d = start(&dir, "cache");
    let create = json!({"name":"c0","mode":"writeback","cache_bdev_name":"ssd0","core_bdev_name":"hdd0"});
    let e = d.err("bdev_cache_create", create.clone(), -libc::EILSEQ);
    assert!(e.contains("not formatted") && e.contains("\"format\": true"), "{e}");
    assert_eq!(d.ok("bdev_get_bdevs", json!({"name":"ssd0"}))[0]["claimed"], json!(false), "claim released");
    let mut fmt = create.clone();
    fmt["format"] = json!(true);
    assert_eq!(d.ok("bdev_cache_create", fmt.clone()), json!("c0"));
    d.err("bdev_cache_create", fmt, EEXIST);
    let e = d.err(
        "bdev_cache_create",
        json!({"name":"c9","mode":"wt","cache_bdev_name":"ssd0","core_bdev_name":"hdd0"}),
        EBUSY,
    );
    assert!(e.contains("hdd0") && e.contains("claimed by c0"), "{e}");
    d.err(
        "bdev_cache_create",
        json!({"name":"c9","mode":"wt","cache_bdev_name":"nope","core_bdev_name":"hdd1"}),
        ENODEV,
    );
    d.err(
        "bdev_cache_create",
        json!({"name":"c9","mode":"fast","cache_bdev_name":"ssd0","core_bdev_name":"hdd1"}),
        INVALID_PARAMS,
    );
    d.err(
        "bdev_cache_create",
        json!({"name":"c9","mode":"wt","cache_bdev_name":"ssd0","core_bdev_name":"hdd1","format":true}),
        EBUSY,
    );
    // a second backing device sharing the cache
    let shared = json!({"name":"c1","mode":"wt","cache_bdev_name":"ssd0","core_bdev_name":"hdd1"});
    assert_eq!(d.ok("bdev_cache_create", shared), json!("c1"));
    let e = d.err("bdev_malloc_delete", json!({"name":"ssd0"}), EBUSY);
    assert!(e.contains("claimed by c0"), "{e}");

    let list = d.ok("bdev_cache_get_bdevs", Value::Null);
    assert_eq!(names(&list), ["c0", "c1"]);
    assert_eq!(list[0]["shared_with"], json!(["c1"]));
    assert_eq!(list[1]["mode"], json!("writethrough"));
    assert_eq!(list[0]["origin"], json!("formatted"));
    assert_eq!(names(&d.ok("bdev_cache_get_bdevs", json!({"name":"hdd1"}))), ["c1"]);
    d.err("bdev_cache_get_bdevs", json!({"name":"nope"}), ENODEV);
    let b = &d.ok("bdev_get_bdevs", json!({"name":"c0"}))[0];
    assert_eq!(b["driver_specific"]["cache"]["core_bdev_name"], json!("hdd0"));

    let st = d.ok("bdev_cache_get_stats", json!({"name":"c0"}));
    assert_eq!(st["mode"], json!("writeback"));
    assert!(st["cache_set"]["nr_segments"].as_u64().unwrap() > 4);
    assert_eq!(st["cache_set"]["dirty_blocks"], json!(0));
    assert_eq!(st["cache_set"]["writeback_rate"], json!("idle"), "nothing dirty: {st}");
    // No foreground reads seen yet: the guard has no baseline and its window is fully open.
    let g = &st["cache_set"]["writeback_guard"];
    assert_eq!((&g["window"], &g["baseline_read_p99_us"]), (&json!(128), &json!(null)), "{st}");
    d.err("bdev_cache_get_stats", json!({"name":"hdd0"}), ENODEV);
    assert_eq!(d.ok("bdev_cache_reset_stats", json!({"name":"c0"})), json!(true));
    d.err("bdev_cache_reset_stats", json!({"name":"nope"}), ENODEV);

    assert_eq!(d.ok("bdev_cache_set_cache_mode", json!({"name":"c1","mode":"pt"})), json!(true));
    assert_eq!(d.ok("bdev_cache_get_bdevs", json!({"name":"c1"}))[0]["mode"], json!("passthrough"));
    d.ok("bdev_cache_set_cache_mode", json!({"name":"c1","mode":"writethrough"}));
    d.err("bdev_cache_set_cache_mode", json!({"name":"c1","mode":"x"}), INVALID_PARAMS);

    // (the full coverage of options, seq cut-off, detach and attach is in tests/rpc_cache.rs)
    assert_eq!(d.ok("bdev_cache_set_seqcutoff", json!({"name":"c0","policy":"always","threshold":1024})), json!(true));
    d.err("bdev_cache_set_seqcutoff", json!({"name":"nope","policy":"never"}), ENODEV);
    assert_eq!(
        d.ok("bdev_cache_set_options", json!({"name":"c0","writeback_percent":10,"io_error_limit":5})),
        json!(true)
    );
    d.err("bdev_cache_set_options", json!({"name":"c0","writeback_percent":101}), INVALID_PARAMS);
    assert_eq!(d.ok("bdev_cache_set_options", json!({"name":"c0","seal_idle_ms":5})), json!(true));
    d.err("bdev_cache_set_options", json!({"name":"c0"}), INVALID_PARAMS);
    d.err("bdev_cache_detach", json!({"name":"nope"}), ENODEV);
    d.err("bdev_cache_attach", json!({"name":"c0","cache_bdev_name":"ssd0"}), -libc::EALREADY);

    assert_eq!(d.ok("bdev_cache_flush_start", json!({"name":"c0"})), json!(true));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = d.ok("bdev_cache_flush_status", json!({"name":"c0"}));
        assert!(s["percent"].is_number() && s["dirty_blocks"].is_u64(), "{s}");
        if s["done"] == json!(true) {
            assert_eq!(s["state"], json!("done"));
            break;
        }
        assert!(Instant::now() < deadline, "flush never finished: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.err("bdev_cache_flush_status", json!({"name":"hdd0"}), ENODEV);

    // delete: the shared member first (nothing dirty), then the last one closes the set
    assert_eq!(d.ok("bdev_cache_delete", json!({"name":"c1"})), json!(true));
    let e = d.err(
        "bdev_cache_create",
        json!({"name":"c1","mode":"wt","cache_bdev_name":"ssd0","core_bdev_name":"hdd1"}),
        EOPNOTSUPP,
    );
    assert!(e.contains("hdd1"), "{e}");
    assert_eq!(d.ok("bdev_cache_delete", json!({"name":"c0"})), json!(true));
    d.err("bdev_cache_delete", json!({"name":"c0"}), ENODEV);
    d.err("bdev_cache_delete", json!({"name":"hdd0"}), ENODEV);
    assert_eq!(d.ok("bdev_get_bdevs", json!({"name":"ssd0"}))[0]["claimed"], json!(false));

    // load: the superblock is there now; cores are found by their backing headers
    let e = d.err("bdev_cache_load", json!({"cache_bdev_name":"ssd0"}), -22);
    assert!(e.contains("\"name\""), "{e}");
    d.err("bdev_cache_load", json!({"cache_bdev_name":"nope","name":"c0"}), ENODEV);
    let e = d.err("bdev_cache_load", json!({"cache_bdev_name":"ssd0","name":"c0"}), -22);
    assert!(e.contains("hdd0, hdd1"), "both backing devices belong to the set: {e}");
    assert_eq!(
        d.ok("bdev_cache_load", json!({"cache_bdev_name":"ssd0","name":"c0","core_bdev_name":"hdd0"})),
        json!("c0")
    );
    let l = d.ok("bdev_cache_get_bdevs", json!({"name":"c0"}));
    assert_eq!((l[0]["core_bdev_name"].clone(), l[0]["origin"].clone()), (json!("hdd0"), json!("loaded")));
    assert_eq!(l[0]["mode"], json!("writeback"), "mode recorded in the superblock");
    // a set that is loaded again by create (format:false) works the same
    d.ok("bdev_cache_delete", json!({"name":"c0"}));
    assert_eq!(d.ok("bdev_cache_create", create), json!("c0"));
}

#[test]
fn nbd_methods() {
    let dir = TempDir::new("rpc-nbd");
    let d = start(&dir, "nbd");
    let sock = format!("unix:{}", dir.join("export.sock").display());
    let bound = d.ok("nbd_server_start", json!({"listen": sock}));
    assert_eq!(bound, json!(sock));
    d.err("nbd_server_start", json!({"listen": sock}), EEXIST);
    let e = d.err("nbd_server_start", json!({"listen": "nohost"}), INVALID_PARAMS);
    assert!(e.contains("listen"), "{e}");
    let tcp = d.ok("nbd_server_start", json!({"listen": "127.0.0.1:0"}));
    assert!(tcp.as_str().unwrap().starts_with("127.0.0.1:"), "{tcp}");

    assert_eq!(d.ok("nbd_export_add", json!({"bdev_name":"hdd0"})), json!("hdd0"));
    assert_eq!(d.ok("nbd_export_add", json!({"bdev_name":"hdd1","export_name":"ro1","read_only":true})), json!("ro1"));
    d.err("nbd_export_add", json!({"bdev_name":"hdd1","export_name":"ro1"}), EEXIST);
    d.err("nbd_export_add", json!({"bdev_name":"nope"}), ENODEV);
    d.err("nbd_export_add", json!({"bdev":"hdd0"}), INVALID_PARAMS);
    let e = d.err("bdev_malloc_delete", json!({"name":"hdd0"}), EBUSY);
    assert!(e.contains("exported over NBD"), "{e}");

    let ex = d.ok("nbd_get_exports", Value::Null);
    assert_eq!(ex.as_array().unwrap().len(), 2);
    let ro = &d.ok("nbd_get_exports", json!({"export_name":"ro1"}))[0];
    assert_eq!((ro["bdev_name"].clone(), ro["read_only"].clone()), (json!("hdd1"), json!(true)));
    assert_eq!(ro["size"], json!(32768u64 * 4096));
    d.err("nbd_get_exports", json!({"export_name":"nope"}), ENODEV);

    let cfg = d.ok("framework_get_config", json!({"name":"nbd"}));
    let methods: Vec<&str> = cfg.as_array().unwrap().iter().map(|e| e["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["nbd_server_start", "nbd_server_start", "nbd_export_add", "nbd_export_add"]);
    assert_eq!(cfg[1]["params"]["listen"], json!("127.0.0.1:0"), "the requested address is saved");

    assert_eq!(d.ok("nbd_export_remove", json!({"export_name":"hdd0"})), json!(true));
    d.err("nbd_export_remove", json!({"export_name":"hdd0"}), ENODEV);
    assert_eq!(d.ok("bdev_malloc_delete", json!({"name":"hdd0"})), json!(true));
    assert_eq!(d.ok("nbd_server_stop", Value::Null), json!(true));
    d.err("nbd_server_stop", Value::Null, ENODEV);
    assert_eq!(d.ok("nbd_get_exports", Value::Null), json!([]));
    // and it starts again
    d.ok("nbd_server_start", json!({"listen": sock}));
}

#[test]
fn two_clients_at_once_and_cli() {
    let dir = TempDir::new("rpc-conc");
    let d = start(&dir, "conc");
    std::thread::scope(|s| {
        for c in 0..2 {
            let d = &d;
            s.spawn(move || {
                let mut client = d.client();
                for i in 0..40 {
                    let name = format!("cc{c}_{i}");
                    let p = json!({"name": name, "num_blocks": 64, "block_size": 512});
                    assert_eq!(client.call("bdev_malloc_create", Some(p)).unwrap(), json!(name));
                    let got = client.call("bdev_get_bdevs", Some(json!({"name": name}))).unwrap();
                    assert_eq!(got[0]["name"], json!(name));
                    assert_eq!(client.call("bdev_malloc_delete", Some(json!({"name": name}))).unwrap(), json!(true));
                }
            });
        }
    });
    assert_eq!(names(&d.ok("bdev_get_bdevs", Value::Null)).len(), 4);

    // the CLI: --key value params, pretty output, exit codes
    let (code, out, err) =
        cli(&d.socket, &["bdev_malloc_create", "--name", "cli0", "--num-blocks", "128", "--block-size", "512"]);
    assert_eq!((code, out.trim()), (0, "\"cli0\""), "{err}");
    let (code, out, _) = cli(&d.socket, &["bdev_get_bdevs", "--name", "cli0"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("pretty JSON on stdout");
    assert_eq!(v[0]["num_blocks"], json!(128));
    assert!(out.contains("\n  "), "indented output");
    let (code, _, err) = cli(&d.socket, &["bdev_get_bdevs", r#"{"name":"nope"}"#]);
    assert_eq!(code, 19, "exit code is the errno");
    assert!(err.contains("Got JSON-RPC error response") && err.contains("-19"), "{err}");
    let (code, _, err) = cli(&d.socket, &["no_such_method"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = cli(&d.socket, &["bdev_get_bdevs", "{bad"]);
    assert_eq!(code, 2, "usage error: {err}");
    let (code, _, err) = cli(&dir.join("absent.sock"), &["rpc_get_methods"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&d.socket, &["--wait", "bdev_get_bdevs"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn cli_wait_shows_flush_progress() {
    let dir = TempDir::new("rpc-wait");
    let d = start(&dir, "wait");
    d.ok(
        "bdev_cache_create",
        json!({"name":"c0","mode":"wb","cache_bdev_name":"ssd0","core_bdev_name":"hdd0","format":true}),
    );
    let (code, out, err) = cli(&d.socket, &["bdev_cache_flush_start", "--name", "c0", "--wait"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "true");
    assert!(err.contains("100.0%"), "progress line: {err}");
}

#[test]
fn python_raw_socket_client() {
    let dir = TempDir::new("rpc-py");
    let d = start(&dir, "py");
    // A plain JSON stream on the Unix socket: one request, one batch.
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
dec = json.JSONDecoder()
buf = ""
def recv_one():
    global buf
    while True:
        try:
            v, end = dec.raw_decode(buf.lstrip())
            buf = buf.lstrip()[end:]
            return v
        except ValueError:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("closed")
            buf += chunk.decode()
s.sendall(json.dumps({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "params": {"name": "hdd0"}, "id": 7}).encode())
r = recv_one()
assert r["jsonrpc"] == "2.0" and r["id"] == 7, r
print(r["result"][0]["name"], r["result"][0]["num_blocks"])
s.sendall(json.dumps([
    {"jsonrpc": "2.0", "method": "bdev_null_create", "params": {"name": "py0", "num_blocks": 8, "block_size": 512}, "id": "a"},
    {"jsonrpc": "2.0", "method": "bdev_null_create", "params": {"name": "py0", "num_blocks": 8, "block_size": 512}, "id": "b"},
    {"jsonrpc": "2.0", "method": "nope", "id": "c"}]).encode())
r = recv_one()
by = {x["id"]: x for x in r}
print(by["a"]["result"], by["b"]["error"]["code"], by["c"]["error"]["code"])
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&d.socket)
        .output()
        .expect("python3 is needed for this test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["hdd0 32768", "py0 -17 -32601"]);
}
