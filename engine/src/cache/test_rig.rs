//! Shared by the cache engine's unit tests: self-describing blocks and a cached bdev on
//! simulated disks, driven through a reactor set.

use std::sync::Arc;

use crate::bdev::BdevDesc;
use crate::cache::{self, CacheMode, CacheOptions, CachedBdev};
use crate::reactor::ReactorSet;
use crate::sim::SimDisk;
use crate::IoBuf;

/// Cache block size of the rigs.
pub(crate) const BS: usize = 4096;

/// Version `v` of block `lba`: every 16 bytes carry the LBA and `v * 1000 + i`, so a
/// misdirected or older block never compares equal.
pub(crate) fn block(lba: u64, v: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (i, c) in b.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&lba.to_le_bytes());
        c[8..].copy_from_slice(&(v * 1000 + i as u64).to_le_bytes());
    }
    b
}

/// A cache set formatted on an 8 MiB simulated cache disk with `backing` attached in
/// writeback mode (formatted on reactor 0).
pub(crate) fn cached_on_sim(rs: &ReactorSet, name: &str, opts: CacheOptions, backing: BdevDesc) -> Arc<CachedBdev> {
    let rs2 = rs.clone();
    let name = name.to_string();
    rs.block_on(0, move || async move {
        let set = cache::format(&name, BdevDesc::new(SimDisk::new("c", 512, 8 << 11)), rs2, opts).await.unwrap();
        let b = set.attach(backing, CacheMode::WriteBack).await.unwrap();
        CachedBdev::new("v", set, b)
    })
    .unwrap()
}

/// Write version `v` of block `lba` through `d` on reactor `r` (not FUA).
pub(crate) fn write(rs: &ReactorSet, d: &BdevDesc, r: usize, lba: u64, v: u64) {
    let d = d.clone();
    rs.block_on(r, move || async move {
        d.channel().unwrap().write(lba * BS as u64, IoBuf::from_slice(&block(lba, v)), false).await.status
    })
    .unwrap()
    .unwrap();
}
