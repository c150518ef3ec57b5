//! Block traces for policy benchmarks: a seeded generator (zipf over a working set, with
//! optional periodic full scans), a text file format (one block number per line, `#`
//! comments), a shared replay cursor, and a plain LRU simulator to compare a cache's hit
//! ratio with.
//!
//! A trace entry is an I/O slot number (offset / io size). Replaying the same file through
//! the cached bdev and through [`Lru`] of the same capacity compares the engine's admission
//! and eviction (promotion after N misses, sequential cutoff, log-order reclaim) with LRU on
//! the identical sequence.

use std::collections::HashMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::rng::Rng;
use crate::zipf::ZipfOffsets;

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceSpec {
    /// Working set in blocks (entries are in `0..blocks`).
    pub blocks: u64,
    /// Zipf accesses (scans come on top).
    pub zipf_accesses: u64,
    pub theta: f64,
    /// After every this many zipf accesses, a full sequential scan `0..blocks`.
    pub scan_every: Option<u64>,
    pub seed: u64,
}

/// Generate the trace: deterministic for a given spec.
pub fn generate(spec: &TraceSpec) -> Result<Vec<u64>, String> {
    if spec.blocks == 0 {
        return Err("trace: the working set must hold at least one block".into());
    }
    if spec.scan_every == Some(0) {
        return Err("trace: --trace-scan-every must be at least 1".into());
    }
    let z = ZipfOffsets::new(spec.blocks, spec.theta)?;
    let mut rng = Rng::new(crate::rng::mix(&[spec.seed, 0x7ace]));
    let scans = spec.scan_every.map_or(0, |k| spec.zipf_accesses / k);
    let mut out = Vec::with_capacity((spec.zipf_accesses + scans * spec.blocks) as usize);
    for i in 1..=spec.zipf_accesses {
        out.push(z.next_slot(&mut rng));
        if spec.scan_every.is_some_and(|k| i % k == 0) {
            out.extend(0..spec.blocks);
        }
    }
    Ok(out)
}

/// Write a trace as text (a header comment, then one block number per line).
pub fn write(path: &Path, header: &str, trace: &[u64]) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut w = BufWriter::new(f);
    let res = (|| {
        for line in header.lines() {
            writeln!(w, "# {line}")?;
        }
        for b in trace {
            writeln!(w, "{b}")?;
        }
        w.flush()
    })();
    res.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Read a trace written by [`write`] (or by hand: one block number per line; blank lines
/// and `#` comments are skipped).
pub fn read(path: &Path) -> Result<Vec<u64>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open trace {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read trace {}: {e}", path.display()))?;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        out.push(t.parse().map_err(|_| format!("trace {} line {}: not a block number: {t:?}", path.display(), n + 1))?);
    }
    if out.is_empty() {
        return Err(format!("trace {} is empty", path.display()));
    }
    Ok(out)
}

/// A trace shared by every queue slot of every reactor: each I/O takes the next entry, so
/// the submission order is the trace order (completion order may differ at QD > 1).
pub struct TraceCursor {
    entries: Vec<u64>,
    next: AtomicU64,
}

impl TraceCursor {
    pub fn new(entries: Vec<u64>) -> TraceCursor {
        TraceCursor { entries, next: AtomicU64::new(0) }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn max(&self) -> u64 {
        self.entries.iter().copied().max().unwrap_or(0)
    }

    /// The next entry (wraps around at the end).
    #[inline]
    pub fn next_slot(&self) -> u64 {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        self.entries[i % self.entries.len()]
    }
}

const NIL: u32 = u32::MAX;

/// A plain LRU of `capacity` blocks: a hash map from block to node, nodes in a vector
/// linked most- to least-recently used.
pub struct Lru {
    capacity: usize,
    map: HashMap<u64, u32>,
    key: Vec<u64>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
}

impl Lru {
    pub fn new(capacity: usize) -> Lru {
        Lru {
            capacity,
            map: HashMap::with_capacity(capacity),
            key: Vec::with_capacity(capacity),
            prev: Vec::with_capacity(capacity),
            next: Vec::with_capacity(capacity),
            head: NIL,
            tail: NIL,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn unlink(&mut self, n: u32) {
        let (p, x) = (self.prev[n as usize], self.next[n as usize]);
        if p == NIL {
            self.head = x;
        } else {
            self.next[p as usize] = x;
        }
        if x == NIL {
            self.tail = p;
        } else {
            self.prev[x as usize] = p;
        }
    }

    fn push_front(&mut self, n: u32) {
        self.prev[n as usize] = NIL;
        self.next[n as usize] = self.head;
        if self.head != NIL {
            self.prev[self.head as usize] = n;
        }
        self.head = n;
        if self.tail == NIL {
            self.tail = n;
        }
    }

    /// Access `block`: true on a hit. A miss inserts it, evicting the least recently used
    /// block when full.
    pub fn access(&mut self, block: u64) -> bool {
        if self.capacity == 0 {
            return false;
        }
        if let Some(&n) = self.map.get(&block) {
            if self.head != n {
                self.unlink(n);
                self.push_front(n);
            }
            return true;
        }
        let n = if self.map.len() < self.capacity {
            self.key.push(block);
            self.prev.push(NIL);
            self.next.push(NIL);
            (self.key.len() - 1) as u32
        } else {
            let t = self.tail;
            self.unlink(t);
            self.map.remove(&self.key[t as usize]);
            self.key[t as usize] = block;
            t
        };
        self.map.insert(block, n);
        self.push_front(n);
        false
    }

    /// Blocks from most to least recently used (for tests).
    pub fn order(&self) -> Vec<u64> {
        let mut v = Vec::with_capacity(self.map.len());
        let mut n = self.head;
        while n != NIL {
            v.push(self.key[n as usize]);
            n = self.next[n as usize];
        }
        v
    }
}

/// LRU simulation of a trace, in the report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LruResult {
    pub capacity_blocks: u64,
    pub accesses: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_pct: f64,
}

/// Run `trace` through an LRU of `capacity` blocks.
pub fn simulate_lru(trace: &[u64], capacity: u64) -> LruResult {
    let mut lru = Lru::new(capacity as usize);
    let hits = trace.iter().filter(|&&b| lru.access(b)).count() as u64;
    let accesses = trace.len() as u64;
    LruResult {
        capacity_blocks: capacity,
        accesses,
        hits,
        misses: accesses - hits,
        hit_pct: if accesses == 0 { 0.0 } else { (hits as f64 / accesses as f64 * 100_000.0).round() / 1000.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scan_every: Option<u64>) -> TraceSpec {
        TraceSpec { blocks: 1000, zipf_accesses: 5000, theta: 0.9, scan_every, seed: 7 }
    }

    #[test]
    fn generation_is_seeded_and_in_range() {
        let a = generate(&spec(None)).unwrap();
        assert_eq!(a, generate(&spec(None)).unwrap());
        assert_eq!(a.len(), 5000);
        assert!(a.iter().all(|&b| b < 1000));
        let other = generate(&TraceSpec { seed: 8, ..spec(None) }).unwrap();
        assert_ne!(a, other);
        // Zipf: the hottest block is far above the uniform share (5 per block).
        let mut counts = HashMap::new();
        for b in &a {
            *counts.entry(*b).or_insert(0u32) += 1;
        }
        assert!(*counts.values().max().unwrap() > 100);
    }

    #[test]
    fn scans_are_inserted_after_every_k_zipf_accesses() {
        let t = generate(&spec(Some(2000))).unwrap();
        assert_eq!(t.len(), 5000 + 2 * 1000);
        // The first scan starts right after access 2000.
        assert_eq!(&t[2000..3000], &(0..1000).collect::<Vec<_>>()[..]);
        assert_eq!(&t[5000..6000], &(0..1000).collect::<Vec<_>>()[..]);
        // The zipf part is the same draw sequence as without scans.
        let plain = generate(&spec(None)).unwrap();
        assert_eq!(&t[..2000], &plain[..2000]);
        assert_eq!(&t[3000..5000], &plain[2000..4000]);
        assert!(generate(&spec(Some(0))).is_err());
    }

    #[test]
    fn file_round_trip() {
        let dir = std::env::temp_dir().join(format!("tc-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.txt");
        let t = generate(&spec(Some(2500))).unwrap();
        write(&p, "zipf 0.9\nseed 7", &t).unwrap();
        assert_eq!(read(&p).unwrap(), t);
        std::fs::write(&p, "# nothing\n\n").unwrap();
        assert!(read(&p).is_err());
        std::fs::write(&p, "1\nx\n").unwrap();
        assert!(read(&p).unwrap_err().contains("line 2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut l = Lru::new(3);
        assert!(!l.access(1));
        assert!(!l.access(2));
        assert!(!l.access(3));
        assert!(l.access(1)); // order 1 3 2
        assert_eq!(l.order(), vec![1, 3, 2]);
        assert!(!l.access(4)); // evicts 2
        assert_eq!(l.order(), vec![4, 1, 3]);
        assert!(!l.access(2)); // evicts 3
        assert!(l.access(1));
        assert!(!l.access(3));
        assert_eq!(l.len(), 3);
        assert!(!Lru::new(0).access(1));
    }

    #[test]
    fn lru_matches_a_naive_model_on_a_seeded_trace() {
        let t =
            generate(&TraceSpec { blocks: 300, zipf_accesses: 20_000, theta: 0.8, scan_every: Some(5000), seed: 3 })
                .unwrap();
        let cap = 40;
        let mut model: Vec<u64> = Vec::new(); // most recent first
        let mut hits = 0;
        for &b in &t {
            if let Some(i) = model.iter().position(|&x| x == b) {
                hits += 1;
                model.remove(i);
            } else if model.len() == cap {
                model.pop();
            }
            model.insert(0, b);
        }
        let r = simulate_lru(&t, cap as u64);
        assert_eq!(r.hits, hits);
        assert_eq!(r.hits + r.misses, t.len() as u64);
    }

    #[test]
    fn a_full_scan_flushes_lru() {
        // A hot set that fits, then a scan larger than the cache: LRU loses the hot set.
        let mut l = Lru::new(10);
        for _ in 0..3 {
            for b in 0..5 {
                l.access(b);
            }
        }
        for b in 100..120 {
            l.access(b);
        }
        assert!((0..5).all(|b| !l.access(b)));
    }

    #[test]
    fn cursor_walks_and_wraps() {
        let c = TraceCursor::new(vec![5, 6, 7]);
        let got: Vec<u64> = (0..5).map(|_| c.next_slot()).collect();
        assert_eq!(got, vec![5, 6, 7, 5, 6]);
        assert_eq!(c.max(), 7);
    }
}
