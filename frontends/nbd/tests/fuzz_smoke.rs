//! Seeded "fuzz smoke": ~100k random and mutated-valid inputs thrown at both
//! parsers as part of the normal test suite. The seed is printed; replay
//! with `NBD_FUZZ_SEED=<seed>`, scale with `NBD_FUZZ_ITERS=<n>`.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tiercache_nbd::*;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn random_bytes(rng: &mut ChaCha8Rng, max: usize) -> Vec<u8> {
    let len = rng.gen_range(0..max);
    (0..len).map(|_| rng.gen()).collect()
}

fn random_cuts(rng: &mut ChaCha8Rng) -> Vec<usize> {
    (0..rng.gen_range(0..6)).map(|_| rng.gen()).collect()
}

#[test]
fn fuzz_smoke_both_parsers() {
    let seed = env_u64("NBD_FUZZ_SEED").unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map(|d| d.as_nanos() as u64).unwrap_or(0x5eed)
    });
    let iters = env_u64("NBD_FUZZ_ITERS").unwrap_or(100_000);
    println!("nbd fuzz smoke: NBD_FUZZ_SEED={seed} NBD_FUZZ_ITERS={iters}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut negotiated, mut requests, mut rejected) = (0u64, 0u64, 0u64);
    for i in 0..iters {
        let case = rng.gen_range(0..4);
        let mut input = match case {
            0 => random_bytes(&mut rng, 300),
            1 => {
                // Random bytes behind a valid greeting answer, to get past flags.
                let mut v = vec![0, 0, 0, 1];
                v.extend(random_bytes(&mut rng, 300));
                v
            }
            2 => valid_handshake(&mut rng),
            _ => valid_requests(&mut rng),
        };
        if case >= 2 && rng.gen_bool(0.8) {
            mutate(&mut rng, &mut input);
        }
        let cuts = random_cuts(&mut rng);
        let result = std::panic::catch_unwind(|| {
            let mut stats = (0, 0, 0);
            if case < 3 {
                let cfg = if i % 2 == 0 { small_config() } else { HandshakeConfig::default() };
                let run = drive_handshake_with(cfg, &input, &cuts, 7);
                if let HandshakeState::Negotiated(n) = &run.state {
                    stats.0 += 1;
                    let rest = &input[run.consumed..];
                    drive_decoder(n.export_config(), rest, &cuts);
                }
            }
            for ev in drive_decoder(export_config(case % 2 == 0), &input, &cuts) {
                match ev {
                    Ev::Request(_) => stats.1 += 1,
                    Ev::Rejected(r) => {
                        stats.2 += 1;
                        let mut out = Vec::new();
                        r.encode(true, &mut out);
                        assert!(out.len() >= 26);
                    }
                    _ => {}
                }
            }
            stats
        });
        match result {
            Ok((n, r, j)) => {
                negotiated += n;
                requests += r;
                rejected += j;
            }
            Err(_) => {
                panic!("iteration {i} panicked; replay with NBD_FUZZ_SEED={seed}; input {input:02x?} cuts {cuts:?}")
            }
        }
    }
    println!("negotiated {negotiated}, requests {requests}, rejected {rejected}");
    if iters >= 10_000 {
        // The generators must actually reach the interesting states.
        assert!(negotiated > iters / 50, "too few negotiations: {negotiated}");
        assert!(requests > iters / 25 && rejected > iters / 10);
    }
}
