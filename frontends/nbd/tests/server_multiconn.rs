//! CAN_MULTI_CONN is honest: a FLUSH on one connection makes writes completed
//! on another connection (served by another reactor) durable. Checked with a
//! power cut of the cache device (SimDisk) right after the flush, then a
//! recovery of the cache set from the surviving images.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use tiercache_engine::bdev::BdevDesc;
use tiercache_engine::cache::{self, CacheMode, CacheOptions, CachedBdev};
use tiercache_engine::reactor::{ReactorConfig, ReactorSet};
use tiercache_engine::sim::{CutMode, SimDisk};
use tiercache_engine::IoBuf;

use support::*;

const SCRIPT: &str = r#"
import nbd, sys
uri = sys.argv[1]
h1 = nbd.NBD(); h1.connect_uri(uri)
h2 = nbd.NBD(); h2.connect_uri(uri)
assert h1.can_multi_conn() and h2.can_multi_conn()
for i in range(32):
    h1.pwrite(bytes([0x40 + i]) * 65536, (1 << 20) + i * 65536)
h2.flush()
print("flushed", flush=True)
sys.stdin.read()
h1.shutdown(); h2.shutdown()
"#;

#[test]
fn flush_on_one_connection_makes_writes_of_another_durable() {
    let Some(py) = python_nbd() else { return };
    let mut rig = Rig::new();
    let (cache_disk, backing_disk) = rig.add_cached_sim("mc", 16, 32);
    let mut child = Command::new(py)
        .args(["-c", SCRIPT, &rig.uri_tcp("mc")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "flushed", "python client failed");
    // Cut power now, with both connections still open: only what the flush
    // made durable survives.
    let seed = seed();
    eprintln!("power cut seed {seed:#x}");
    let cache_img = cache_disk.cut_power(seed, CutMode::DROP_ALL);
    let backing_img = backing_disk.cut_power(seed ^ 1, CutMode::DROP_ALL);
    drop(child.stdin.take().map(|mut s| s.write_all(b"")));
    assert!(child.wait().expect("wait").success(), "python client exited with an error");
    drop(rig);

    let rs = ReactorSet::start(ReactorConfig::unpinned(2)).expect("reactors");
    let rs2 = rs.clone();
    let cdisk = SimDisk::from_image("cache2", 512, cache_img);
    let bdisk = SimDisk::from_image("backing2", 512, backing_img);
    let (cb, data) = rs
        .block_on(0, move || async move {
            let opts = CacheOptions { segment_size: 128 << 10, ..CacheOptions::default() };
            let set = cache::load("cs_mc", BdevDesc::new(cdisk), rs2, opts).await.expect("recover cache set");
            let b = set.attach(BdevDesc::new(bdisk), CacheMode::WriteBack).await.expect("attach");
            let cb = CachedBdev::new("recovered", set, b);
            let ch = BdevDesc::new(cb.clone()).channel().expect("channel");
            let c = ch.read(1 << 20, IoBuf::new(32 * 65536)).await;
            c.status.expect("read");
            (cb, c.buf.expect("buf").to_vec())
        })
        .expect("reactor");
    for i in 0..32usize {
        let chunk = &data[i * 65536..(i + 1) * 65536];
        assert!(
            chunk.iter().all(|&b| b == 0x40 + i as u8),
            "write {i} (connection 1) lost although connection 2 flushed"
        );
    }
    cb.cache_set().stop_migration();
    rs.stop();
}
