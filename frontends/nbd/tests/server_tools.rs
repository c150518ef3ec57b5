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

/// qemu-io `-c` script; fails on a non-zero exit or any reported failure.
fn qemu_io(qemu_io: &std::path::Path, uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(qemu_io);
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for bad in ["failed", "error", "Error", "Pattern verification"] {
        assert!(!text.contains(bad), "qemu-io reported {bad:?}:\n{text}");
    }
    text
}

#[test]
fn qemu_io_patterns_fua_zeroes_trim_flush_over_tcp_and_unix() {
    let Some(qio) = tool("qemu-io") else { return };
    let mut rig = Rig::new();
    rig.add_malloc("m", 32, 512, false);
    rig.add_cached_malloc("c", 32, 64);
    for uri in [rig.uri_tcp("m"), rig.uri_unix("m"), rig.uri_tcp("c"), rig.uri_unix("c")] {
        let out = qemu_io(
            &qio,
            &uri,
            &[
                "write -P 0xab 0 1M",
                "write -f -P 0xcd 1M 64k", // FUA
                "write -P 0x11 3M 4k",
                "flush",
                "read -P 0xab 0 1M",
                "read -P 0xcd 1M 64k",
                "read -P 0x11 3M 4k",
                "write -z 3M 4k", // WRITE_ZEROES
                "read -P 0 3M 4k",
                "write -P 0x22 4M 256k",
                "write -z -u 4M 256k", // zeroes that may unmap
                "read -P 0 4M 256k",
                "write -P 0x33 8M 4M", // bigger than one send buffer
                "read -P 0x33 8M 4M",
                "aio_write -P 0x44 16M 64k",
                "aio_write -P 0x45 17M 64k",
                "aio_flush",
                "read -P 0x44 16M 64k",
                "read -P 0x45 17M 64k",
            ],
        );
        assert!(out.contains("wrote 65536/65536 bytes at offset 1048576"), "{uri}: {out}");
        // A new connection sees what the first one wrote.
        qemu_io(&qio, &uri, &["read -P 0xab 0 1M", "read -P 0x33 8M 4M"]);
    }
}

#[test]
fn qemu_img_convert_roundtrip_and_compare() {
    let Some(qimg) = tool("qemu-img") else { return };
    let mut rig = Rig::new();
    rig.add_cached_malloc("c", 16, 24);
    rig.add_malloc("m", 24, 4096, false);
    for export in ["c", "m"] {
        let src = rig.dir.path().join(format!("src-{export}.raw"));
        std::fs::write(&src, random_bytes(rig.size_of(export) as usize, seed())).expect("write src");
        let uri = rig.uri_tcp(export);
        let back = rig.dir.path().join(format!("back-{export}.raw"));
        run(Command::new(&qimg).args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri));
        run(Command::new(&qimg).args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&back));
        run(Command::new(&qimg).args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&back));
        run(Command::new(&qimg).args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri));
        assert!(std::fs::read(&src).expect("src") == std::fs::read(&back).expect("back"), "{export}: bytes differ");
    }
}

#[test]
fn nbdcopy_file_to_export_and_back_is_byte_identical() {
    let Some(nbdcopy) = tool("nbdcopy") else { return };
    let mut rig = Rig::new();
    rig.add_malloc("m", 32, 512, false);
    rig.add_cached_malloc("c", 16, 32);
    for (export, uri) in [("m", rig.uri_tcp("m")), ("c", rig.uri_unix("c"))] {
        let data = random_bytes(rig.size_of(export) as usize, seed());
        let src = rig.dir.path().join("src.raw");
        std::fs::write(&src, &data).expect("write src");
        let back = rig.dir.path().join("back.raw");
        // nbdcopy opens several connections (multi-conn) and many requests each.
        run(Command::new(&nbdcopy).arg("--flush").arg(&src).arg(&uri));
        run(Command::new(&nbdcopy).arg(&uri).arg(&back));
        assert!(std::fs::read(&back).expect("back") == data, "{uri}: copy differs");
    }
}

#[test]
fn fio_nbd_engine_random_writes_verify_with_several_jobs() {
    let Some(fio) = tool("fio") else { return };
    let mut rig = Rig::new();
    rig.add_malloc("m", 64, 4096, false);
    rig.add_cached_malloc("c", 32, 64);
    for (export, rw) in [("m", "randwrite"), ("c", "randwrite"), ("c", "randrw")] {
        let out = run(Command::new(&fio).args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", rig.uri_tcp(export)),
            &format!("--rw={rw}"),
            "--bs=4k",
            "--size=8m",
            "--offset_increment=8m", // each job its own region: verify stays valid
            "--numjobs=4",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--group_reporting",
            "--output-format=json",
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        let json = &text[text.find('{').expect("json")..];
        let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
        for job in v["jobs"].as_array().expect("jobs") {
            assert_eq!(job["error"], 0, "{export}: {job}");
            assert!(job["write"]["total_ios"].as_u64().unwrap_or(0) > 0, "{export}: no writes");
            assert!(job["read"]["total_ios"].as_u64().unwrap_or(0) > 0, "{export}: no verify reads");
        }
        assert!(!text.contains("verify: bad"), "{export}: verify failures");
    }
}

/// Runs cleanup steps in reverse order on drop (every exit path, panics included).
#[derive(Default)]
struct Cleanup(Vec<(String, Box<dyn FnMut()>)>);

impl Cleanup {
    fn push(&mut self, what: &str, f: impl FnMut() + 'static) {
        self.0.push((what.to_string(), Box::new(f)));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        while let Some((what, mut f)) = self.0.pop() {
            eprintln!("cleanup: {what}");
            f();
        }
    }
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// nbdfuse exposes the export as a file, a loop device goes on top, then a
/// filesystem is made, filled, unmounted and checked read-only.
fn filesystem_on_export(fs: &str, block_size: u32) {
    let tools = ["nbdfuse", "losetup", "mount", "umount", "fusermount3", &format!("mkfs.{fs}")];
    let check = if fs == "xfs" { "xfs_repair" } else { "e2fsck" };
    let mut paths = Vec::new();
    for t in tools.iter().copied().chain([check]) {
        match tool(t) {
            Some(p) => paths.push(p),
            None => return,
        }
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root || !std::path::Path::new("/dev/fuse").exists() {
        let why = "needs root, /dev/fuse and loop devices";
        assert!(std::env::var_os("CI").is_none(), "CI: {why}");
        eprintln!("SKIP: {why}");
        return;
    }
    let rig = Rig::new();
    rig.add_malloc("fs", 320, block_size, false);
    let fuse_dir = rig.dir.path().join("fuse");
    let mnt = rig.dir.path().join("mnt");
    std::fs::create_dir_all(&fuse_dir).expect("mkdir");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let image = fuse_dir.join("disk.img");
    let mut cleanup = Cleanup::default();

    let mut child = Command::new("nbdfuse").arg(&image).arg(rig.uri_unix("fs")).spawn().expect("nbdfuse");
    let pid = child.id();
    {
        let fuse_dir = fuse_dir.clone();
        cleanup.push("nbdfuse", move || {
            let _ = quiet(Command::new("fusermount3").arg("-u").arg(&fuse_dir));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            eprintln!("nbdfuse (pid {pid}) did not exit; killing it");
            let _ = child.kill();
            let _ = child.wait();
        });
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !image.exists() {
        assert!(std::time::Instant::now() < deadline, "nbdfuse did not expose {}", image.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut losetup = Command::new("losetup");
    losetup.args(["--find", "--show"]);
    if block_size == 4096 {
        losetup.args(["--sector-size", "4096"]);
    }
    let out = run(losetup.arg(&image));
    let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    {
        let l = loopdev.clone();
        cleanup.push("loop device", move || {
            let _ = quiet(Command::new("losetup").args(["-d", &l]));
        });
    }
    if fs == "xfs" {
        run(Command::new("mkfs.xfs").args(["-q", "-f", &loopdev]));
    } else {
        run(Command::new("mkfs.ext4").args(["-q", "-F", &loopdev]));
    }
    run(Command::new("mount").arg(&loopdev).arg(&mnt));
    {
        let m = mnt.clone();
        cleanup.push("mount", move || {
            if quiet(Command::new("mountpoint").arg("-q").arg(&m)) {
                let _ = quiet(Command::new("umount").arg(&m)) || quiet(Command::new("umount").arg("-l").arg(&m));
            }
        });
    }
    let seed = seed();
    let mut files = Vec::new();
    for i in 0..24u64 {
        let data = random_bytes(((i * 37) % 17 + 1) as usize * 61_440, seed ^ i);
        let p = mnt.join(format!("f{i}"));
        std::fs::write(&p, &data).expect("write file");
        files.push((format!("f{i}"), data));
    }
    std::fs::create_dir_all(mnt.join("d/e")).expect("mkdir");
    run(&mut Command::new("sync"));
    run(Command::new("umount").arg(&mnt));
    if fs == "xfs" {
        run(Command::new("xfs_repair").args(["-n", &loopdev]));
    } else {
        run(Command::new("e2fsck").args(["-fn", &loopdev]));
    }
    // Remount read-only and read everything back through a fresh page cache.
    run(Command::new("losetup").args(["-d", &loopdev]));
    let mut losetup = Command::new("losetup");
    losetup.args(["--find", "--show", "--read-only"]);
    if block_size == 4096 {
        losetup.args(["--sector-size", "4096"]);
    }
    let out = run(losetup.arg(&image));
    let loop2 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    {
        let l = loop2.clone();
        cleanup.push("loop device (ro)", move || {
            let _ = quiet(Command::new("losetup").args(["-d", &l]));
        });
    }
    let mut mount = Command::new("mount");
    mount.args(["-o", if fs == "xfs" { "ro,norecovery" } else { "ro" }]);
    run(mount.arg(&loop2).arg(&mnt));
    for (name, data) in &files {
        assert!(std::fs::read(mnt.join(name)).expect("read back") == *data, "{fs}: {name} differs");
    }
    drop(cleanup);
}

#[test]
fn nbdfuse_loop_ext4_mkfs_write_fsck() {
    filesystem_on_export("ext4", 512);
}

#[test]
fn nbdfuse_loop_xfs_4k_sectors_mkfs_write_repair() {
    filesystem_on_export("xfs", 4096);
}
