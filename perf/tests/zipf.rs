//! Zipf sampler sanity: seeded frequencies follow 1/k^θ.

use std::collections::HashSet;

use tiercache_perf::rng::Rng;
use tiercache_perf::zipf::{Zipf, ZipfOffsets};

fn counts(n: u64, theta: f64, samples: u32, seed: u64) -> Vec<u64> {
    let z = Zipf::new(n, theta).unwrap();
    let mut rng = Rng::new(seed);
    let mut c = vec![0u64; n as usize + 1];
    for _ in 0..samples {
        let k = z.sample(&mut rng);
        assert!((1..=n).contains(&k));
        c[k as usize] += 1;
    }
    c
}

#[test]
fn rank_frequencies_match_theory() {
    for theta in [0.8, 0.99, 1.0, 1.2] {
        let n = 1000;
        let samples = 400_000;
        let c = counts(n, theta, samples, 42);
        let z = Zipf::new(n, theta).unwrap();
        // Rank 1 vs rank 10: 10^θ.
        let ratio = c[1] as f64 / c[10] as f64;
        let want = 10f64.powf(theta);
        assert!((ratio / want - 1.0).abs() < 0.06, "theta {theta}: f(1)/f(10) = {ratio:.3}, theory {want:.3}");
        // Absolute frequencies of a few ranks against 1/(k^θ H(n,θ)).
        for k in [1u64, 2, 10, 100] {
            let p = z.probability(k);
            let got = c[k as usize] as f64 / samples as f64;
            let sd = (p * (1.0 - p) / samples as f64).sqrt();
            assert!((got - p).abs() < 5.0 * sd + 1e-4, "theta {theta} rank {k}: {got:.5} vs {p:.5}");
        }
    }
}

#[test]
fn sampler_is_seeded_and_handles_edges() {
    assert_eq!(counts(50, 1.1, 10_000, 7), counts(50, 1.1, 10_000, 7));
    assert_ne!(counts(50, 1.1, 10_000, 7), counts(50, 1.1, 10_000, 8));
    let one = counts(1, 2.0, 100, 1);
    assert_eq!(one[1], 100);
    assert!(Zipf::new(0, 1.0).is_err());
    assert!(Zipf::new(10, 0.0).is_err());
    assert!(Zipf::new(10, f64::NAN).is_err());
    // Huge n: O(1) setup, samples in range.
    let z = Zipf::new(1 << 40, 0.99).unwrap();
    let mut rng = Rng::new(3);
    for _ in 0..1000 {
        assert!((1..=1 << 40).contains(&z.sample(&mut rng)));
    }
}

#[test]
fn offsets_scatter_ranks_over_the_device_bijectively() {
    for n in [1u64, 2, 1000, 4096, 65_537] {
        let o = ZipfOffsets::new(n, 1.0).unwrap();
        let slots: HashSet<u64> = (1..=n).map(|k| o.slot_of_rank(k)).collect();
        assert_eq!(slots.len() as u64, n, "n = {n}: ranks -> slots is a bijection");
        assert!(slots.iter().all(|&s| s < n));
    }
    // The hottest ranks are not one contiguous run at the start of the device.
    let o = ZipfOffsets::new(1 << 20, 1.0).unwrap();
    let hot: Vec<u64> = (1..=8).map(|k| o.slot_of_rank(k)).collect();
    assert!(hot.windows(2).any(|w| w[1].abs_diff(w[0]) > 1000), "{hot:?}");
}
