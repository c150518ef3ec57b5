//! Quick end-to-end check of the in-memory backends through the engine's channel.

use std::sync::Arc;

use tiercache_bdevs::malloc::MallocBdev;
use tiercache_bdevs::null::NullBdev;
use tiercache_engine::bdev::{Bdev, BdevDesc};
use tiercache_engine::reactor::{ReactorConfig, ReactorSet};
use tiercache_engine::{Errno, IoBuf};

#[test]
fn malloc_and_null_round_trip() {
    let set = ReactorSet::start(ReactorConfig::unpinned(1)).unwrap();
    let m: Arc<dyn Bdev> = MallocBdev::create("m0", 4096, 512).unwrap();
    let n: Arc<dyn Bdev> = NullBdev::create("n0", 4096, 4096).unwrap();
    let (dm, dn) = (BdevDesc::new(m), BdevDesc::new(n));
    set.block_on(0, move || async move {
        let ch = dm.channel().unwrap();
        let w = IoBuf::from_slice(&[7u8; 8192]);
        ch.write(1 << 20, w, false).await.status.unwrap();
        let r = ch.read(1 << 20, IoBuf::zeroed(8192)).await;
        r.status.unwrap();
        assert!(r.buf.unwrap().iter().all(|&b| b == 7));
        let e = ch.read(4096 * 512, IoBuf::new(512)).await;
        assert_eq!(e.status, Err(Errno::EINVAL));
        let nc = dn.channel().unwrap();
        let r = nc.read(0, IoBuf::from_slice(&[3u8; 4096])).await;
        r.status.unwrap();
        assert!(r.buf.unwrap().iter().all(|&b| b == 3), "null reads leave the buffer untouched");
    })
    .unwrap();
    set.stop();
}
