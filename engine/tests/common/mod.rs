//! Shared by the engine's integration tests (`mod common;`): self-describing blocks and a
//! write helper.

use tiercache_engine::bdev::BdevDesc;
use tiercache_engine::reactor::ReactorSet;
use tiercache_engine::IoBuf;

/// Cache block size of the test rigs.
pub const BS: usize = 4096;

/// Version `v` of block `lba`: every 16 bytes carry the LBA and `v * 1000 + i`, so a
/// misdirected or older block never compares equal.
pub fn block(lba: u64, v: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (i, c) in b.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&lba.to_le_bytes());
        c[8..].copy_from_slice(&(v * 1000 + i as u64).to_le_bytes());
    }
    b
}

/// Write version `v` of block `lba` through `d` on reactor `r` (not FUA); panics on error.
// Not every test crate that includes this module writes through it.
#[allow(dead_code)]
pub fn write_block(rs: &ReactorSet, d: &BdevDesc, r: usize, lba: u64, v: u64) {
    let d = d.clone();
    rs.block_on(r, move || async move {
        d.channel().unwrap().write(lba * BS as u64, IoBuf::from_slice(&block(lba, v)), false).await.status
    })
    .unwrap()
    .unwrap();
}
