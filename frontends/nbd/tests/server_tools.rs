//! The server against real NBD clients: nbdinfo, qemu-io, qemu-img, nbdcopy,
//! fio's nbd engine, nbdfuse + loop devices + mkfs/fsck, libnbd (Python).
//! Each test skips (or fails, with CI set) when its tool is missing.

mod support;

use std::process::Command;

use support::*;

#[test]
fn nbdinfo_shows_exports_sizes_and_flags() {
    let Some(nbdinfo) = tool("nbdinfo") else { return };
    let rig = Rig::new();
    rig.add_malloc("disk0", 64, 512, false);
    rig.add_malloc("ro", 8, 4096, true);
    rig.add_malloc("third", 16, 4096, false);

    let out = run(Command::new(&nbdinfo).args(["--json", &rig.uri_tcp("disk0")]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk0");
    assert_eq!(e["export-size"], 64u64 << 20);
    assert_eq!(e["is_read_only"], false);
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_cache", "can_multi_conn"] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(v["protocol"], "newstyle-fixed");

    let out = run(Command::new(&nbdinfo).args(["--json", &rig.uri_unix("ro")]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["export-size"], 8u64 << 20);
    assert_eq!(e["block_size_minimum"], 4096);

    let out = run(Command::new(&nbdinfo).args(["--list", "--json", &format!("nbd://127.0.0.1:{}", rig.port())]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    let names: Vec<&str> =
        v["exports"].as_array().expect("exports").iter().filter_map(|e| e["export-name"].as_str()).collect();
    assert_eq!(names, ["disk0", "ro", "third"]);
    let desc = v["exports"][0]["description"].as_str().unwrap_or_default();
    assert_eq!(desc, "malloc 64 MiB");
    let st = rig.server.exports();
    assert_eq!(st.len(), 3);
    assert_eq!((st[1].name.as_str(), st[1].read_only, st[1].block_size, st[1].size), ("ro", true, 4096, 8 << 20));
}
