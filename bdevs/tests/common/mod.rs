//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code)]

use std::path::PathBuf;

use tiercache_engine::reactor::{ReactorConfig, ReactorSet};

pub fn reactors(n: usize) -> ReactorSet {
    ReactorSet::start(ReactorConfig::unpinned(n)).expect("start reactors")
}

/// The seed of a test: `TC_SEED` if set, else a fixed default; printed so a failure can be
/// replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("TC_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x7C_B0E5);
    println!("{test}: seed {s} (replay with TC_SEED={s})");
    s
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic bytes for the device range starting at `offset`, tagged by `seed`.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut pos = offset;
    while v.len() < len {
        let w = mix(seed ^ mix(pos / 8)).to_le_bytes();
        let skip = (pos % 8) as usize;
        let take = (8 - skip).min(len - v.len());
        v.extend_from_slice(&w[skip..skip + take]);
        pos += take as u64;
    }
    v
}

/// A file of `len` bytes in `dir` (created fresh), removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(dir: &str, tag: &str, len: u64) -> TempFile {
        let d = PathBuf::from(dir).join(format!("tc-bdevs-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        let p = d.join(tag);
        let f = std::fs::File::create(&p).expect("create temp file");
        f.set_len(len).expect("size temp file");
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
