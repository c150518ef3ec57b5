//! The verify workload's block format.
//!
//! Every block (of the bdev's block size) of a verify write starts with a header, followed
//! by a payload that is a pure function of (seed, LBA, sequence):
//!
//! ```text
//! 0..8    magic "TCPERFV1" (little-endian u64)
//! 8..16   LBA of this block
//! 16..24  seed of the run
//! 24..32  sequence (how many times the writer wrapped around its region)
//! 32..36  crc32c of the whole block, computed with these 4 bytes as zero
//! 36..40  zero
//! 40..    payload: xoshiro256++ words seeded by mix(seed, lba, seq)
//! ```
//!
//! The header makes a mismatch explainable (a block from the wrong LBA, a stale write, a
//! foreign run, torn/corrupted contents) and the CRC catches payload corruption even when
//! the expected block is not at hand.

use serde::Serialize;

use crate::rng::{mix, Rng};

pub const MAGIC: u64 = u64::from_le_bytes(*b"TCPERFV1");
pub const HEADER_LEN: usize = 40;
const CRC_AT: usize = 32;

/// A decoded block header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BlockHeader {
    pub magic: u64,
    pub lba: u64,
    pub seed: u64,
    pub seq: u64,
    pub crc: u32,
}

impl BlockHeader {
    pub fn decode(block: &[u8]) -> BlockHeader {
        let u = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
        BlockHeader {
            magic: u(0),
            lba: u(8),
            seed: u(16),
            seq: u(24),
            crc: u32::from_le_bytes(block[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes")),
        }
    }
}

impl std::fmt::Display for BlockHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "magic={:#018x} lba={} seed={} seq={} crc={:#010x}",
            self.magic, self.lba, self.seed, self.seq, self.crc
        )
    }
}

/// crc32c of a block with its CRC field taken as zero.
pub fn block_crc(block: &[u8]) -> u32 {
    let c = crc32c::crc32c(&block[..CRC_AT]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &block[CRC_AT + 4..])
}

/// Fill one block with its expected contents.
pub fn fill_block(block: &mut [u8], lba: u64, seed: u64, seq: u64) {
    debug_assert!(block.len() >= HEADER_LEN && block.len().is_multiple_of(8));
    block[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    block[8..16].copy_from_slice(&lba.to_le_bytes());
    block[16..24].copy_from_slice(&seed.to_le_bytes());
    block[24..32].copy_from_slice(&seq.to_le_bytes());
    block[32..40].fill(0);
    let mut rng = Rng::new(mix(&[seed, lba, seq]));
    for w in block[HEADER_LEN..].chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let crc = block_crc(block);
    block[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Fill a multi-block buffer starting at `first_lba`.
pub fn fill(buf: &mut [u8], block_size: usize, first_lba: u64, seed: u64, seq: u64) {
    for (i, b) in buf.chunks_exact_mut(block_size).enumerate() {
        fill_block(b, first_lba + i as u64, seed, seq);
    }
}

/// One block that did not read back as written.
#[derive(Clone, Debug, Serialize)]
pub struct Mismatch {
    pub lba: u64,
    pub expected: BlockHeader,
    pub got: BlockHeader,
    /// crc32c of the block as read (differs from `got.crc` when the block is corrupt).
    pub got_crc_computed: u32,
    /// First byte (within the block) that differs from the expected contents.
    pub first_diff_byte: usize,
    /// How many bytes of the block differ.
    pub diff_bytes: usize,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LBA {}: expected [{}] got [{}] (crc of data read {:#010x}{}), {} byte(s) differ, first at offset {}",
            self.lba,
            self.expected,
            self.got,
            self.got_crc_computed,
            if self.got_crc_computed == self.got.crc { ", self-consistent" } else { ", corrupt" },
            self.diff_bytes,
            self.first_diff_byte
        )
    }
}

/// Compare what was read with what was expected, block by block; calls `on_mismatch` for
/// each bad block. Returns the number of blocks checked.
pub fn check(
    expected: &[u8],
    got: &[u8],
    block_size: usize,
    first_lba: u64,
    mut on_mismatch: impl FnMut(Mismatch),
) -> u64 {
    debug_assert_eq!(expected.len(), got.len());
    if expected == got {
        return (expected.len() / block_size) as u64;
    }
    let mut n = 0;
    for (i, (e, g)) in expected.chunks_exact(block_size).zip(got.chunks_exact(block_size)).enumerate() {
        n += 1;
        if e == g {
            continue;
        }
        let first = e.iter().zip(g).position(|(a, b)| a != b).unwrap_or(0);
        let diff = e.iter().zip(g).filter(|(a, b)| a != b).count();
        on_mismatch(Mismatch {
            lba: first_lba + i as u64,
            expected: BlockHeader::decode(e),
            got: BlockHeader::decode(g),
            got_crc_computed: block_crc(g),
            first_diff_byte: first,
            diff_bytes: diff,
        });
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_carry_a_self_checking_header() {
        let mut b = vec![0u8; 8192];
        fill(&mut b, 4096, 10, 42, 3);
        let h = BlockHeader::decode(&b[4096..]);
        assert_eq!(h.magic, MAGIC);
        assert_eq!((h.lba, h.seed, h.seq), (11, 42, 3));
        assert_eq!(h.crc, block_crc(&b[4096..]));
        let good = b.clone();
        assert_eq!(check(&good, &b, 4096, 10, |_| panic!("no mismatch expected")), 2);
        b[4096 + 100] ^= 1;
        let mut seen = Vec::new();
        check(&good, &b, 4096, 10, |m| seen.push(m));
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].lba, 11);
        assert_eq!(seen[0].first_diff_byte, 100);
        assert_ne!(seen[0].got_crc_computed, seen[0].got.crc);
    }
}
