//! Single-thread throughput of the block index's hot operations on a full index: the
//! install of a 4K write that supersedes an older version, a lookup that hits, and one
//! that misses. The index is sized as the cache engine sizes it for a 1 GiB cache of 4K
//! blocks in 1 MiB segments (1024 segments of 255 slots), and filled with random
//! overwrites of a working set as large as the cache, so chains hold superseded nodes as
//! they do under a sustained random write before reclaim.
//!
//! ```sh
//! cargo run --release -p tiercache-engine --example index_bench -- [SEED]
//! ```

use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tiercache_engine::cache::index::{BackingIdx, BlockIndex, BlockKey, EntryKind, Lba};

const SEGMENTS: u32 = 1024;
const SLOTS: u32 = 255;

fn key(lba: u64) -> BlockKey {
    BlockKey::new(BackingIdx(0), Lba(lba)).expect("lba fits in 48 bits")
}

fn main() {
    let seed = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0x5eed_u64);
    println!("seed {seed}");
    let ix = BlockIndex::new(SEGMENTS, SLOTS).expect("geometry");
    let mut r = ix.reclaimer().expect("first reclaimer");
    let mut free = ix.take_unused(&mut r).expect("fresh index");
    let p = ix.register();
    let working_set = u64::from(SEGMENTS * SLOTS);
    let mut rng = SmallRng::seed_from_u64(seed);

    // Installs: every slot of every segment, random keys of the working set.
    let t = Instant::now();
    let mut installs = 0u64;
    while let Some(f) = free.pop() {
        let open = ix.open_segment(f).expect("free segment opens");
        for i in 0..SLOTS {
            let k = key(rng.gen_range(0..working_set));
            ix.install(&p, &open, i, k, EntryKind::Dirty).expect("newest version");
            installs += 1;
        }
        ix.seal(open).expect("open segment seals");
    }
    let install_ns = t.elapsed().as_nanos() as f64 / installs as f64;

    let rounds = 4_000_000u64;
    let t = Instant::now();
    let mut hits = 0u64;
    for _ in 0..rounds {
        hits += u64::from(ix.lookup(&p, key(rng.gen_range(0..working_set))).is_some());
    }
    let lookup_ns = t.elapsed().as_nanos() as f64 / rounds as f64;
    let t = Instant::now();
    let mut misses = 0u64;
    for _ in 0..rounds {
        misses += u64::from(ix.lookup(&p, key(rng.gen_range(working_set..2 * working_set))).is_none());
    }
    let miss_ns = t.elapsed().as_nanos() as f64 / rounds as f64;
    assert_eq!(misses, rounds, "keys outside the working set were never installed");
    println!(
        "install {install_ns:.0} ns, lookup (working set, {:.0}% hit) {lookup_ns:.0} ns, lookup miss {miss_ns:.0} ns",
        hits as f64 * 100.0 / rounds as f64
    );
}
