//! `delay`: latency injection over a base bdev (SPDK `bdev_delay`, Linux dm-delay).
//!
//! Like SPDK, the I/O goes to the base at once and its *completion* is held back by the
//! injected latency (total latency = base latency + injected latency), on the reactor's
//! timers ([`reactor::sleep`]): no thread ever blocks. Reads use the read latencies; writes
//! and every other type (flush, unmap, write-zeroes) use the write latencies. Latencies are
//! in microseconds and can be changed at run time ([`DelayBdev::update_latency`]); an I/O
//! draws its latency at submission.
//!
//! # The distribution
//!
//! SPDK delays 1 I/O in 100 by `p99` and the rest by `avg`, which makes the mean larger than
//! `avg` and the measured 99th percentile unstable. Here each class draws from a
//! [`LatencyModel`] whose **mean is `avg`** and whose **99th percentile is `p99`**:
//!
//! - 1 %: tail, uniform on [p99, 1.2·p99];
//! - 99 %: bulk, made of a ramp (weight r) uniform on [c, p99] — so there is density on both
//!   sides of p99 and the empirical p99 of a sample sits close to it — and a core (weight
//!   1−r) uniform on [c−h, c+h] with h = min(c/2, p99−c);
//! - r = 0.1, lowered when needed, and the centre c solved so the mean is exactly `avg`.
//!
//! A mean of `avg` needs `avg ≥ 0.011·p99` (at least 1 % of draws are ≥ p99); below that, c
//! clamps to 0 and the mean exceeds `avg`. `p99 < avg` is treated as `p99 = avg`.
//! `avg = p99 = 0` injects nothing (the I/O is forwarded untouched, no allocation).
//!
//! Draws come from a ChaCha8 RNG per channel seeded with
//! [`channel_seed`](crate::channel_seed)`(seed, reactor index)`: deterministic per reactor.

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tiercache_engine::bdev::{Bdev, BdevChannel, BdevDesc, BdevInfo, IoCompletion, IoFuture, IoRequest, IoType};
use tiercache_engine::reactor;
use tiercache_engine::Errno;

/// Largest latency accepted (one hour, in microseconds).
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

/// One of the four latencies of a delay bdev (SPDK's `delay_type` names).
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyKind {
    AvgRead,
    P99Read,
    AvgWrite,
    P99Write,
}

/// The latencies of a delay bdev, in microseconds.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DelayLatencies {
    pub avg_read_us: u64,
    pub p99_read_us: u64,
    pub avg_write_us: u64,
    pub p99_write_us: u64,
}

/// A latency distribution with a given mean and 99th percentile (see the module docs).
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct LatencyModel {
    p99: f64,
    ramp: f64,
    centre: f64,
    half: f64,
}

const TAIL: f64 = 0.01;
const TAIL_SPAN: f64 = 0.2;

impl LatencyModel {
    pub fn new(avg_us: u64, p99_us: u64) -> LatencyModel {
        let avg = avg_us as f64;
        let p99 = (p99_us.max(avg_us)) as f64;
        if p99 == 0.0 {
            return LatencyModel { p99: 0.0, ramp: 0.0, centre: 0.0, half: 0.0 };
        }
        // mean = TAIL·p99·(1 + TAIL_SPAN/2) + (1−TAIL)·[(1−r)·c + r·(c + p99)/2]
        let tail_mean = TAIL * p99 * (1.0 + TAIL_SPAN / 2.0);
        let bulk_mean = ((avg - tail_mean) / (1.0 - TAIL)).max(0.0);
        // Bulk mean with the centre at 0 is r·p99/2: keep it ≤ bulk_mean.
        let ramp = if p99 > 0.0 { (2.0 * bulk_mean / p99).clamp(0.0, 0.1) } else { 0.0 };
        let centre = ((bulk_mean - ramp * p99 / 2.0) / (1.0 - ramp / 2.0)).clamp(0.0, p99);
        let half = (centre / 2.0).min(p99 - centre);
        LatencyModel { p99, ramp, centre, half }
    }

    /// Whether every draw is zero.
    pub fn is_zero(&self) -> bool {
        self.p99 == 0.0
    }

    /// One latency in microseconds.
    pub fn sample_us(&self, rng: &mut impl Rng) -> f64 {
        if self.is_zero() {
            return 0.0;
        }
        let u: f64 = rng.gen();
        let v: f64 = rng.gen();
        if u < TAIL {
            self.p99 * (1.0 + TAIL_SPAN * v)
        } else if u < TAIL + (1.0 - TAIL) * self.ramp {
            self.centre + (self.p99 - self.centre) * v
        } else {
            self.centre - self.half + 2.0 * self.half * v
        }
    }

    pub fn sample(&self, rng: &mut impl Rng) -> Duration {
        Duration::from_nanos((self.sample_us(rng) * 1000.0) as u64)
    }
}

struct Latencies {
    us: [AtomicU64; 4],
    generation: AtomicU64,
}

impl Latencies {
    fn get(&self) -> DelayLatencies {
        DelayLatencies {
            avg_read_us: self.us[0].load(Ordering::Acquire),
            p99_read_us: self.us[1].load(Ordering::Acquire),
            avg_write_us: self.us[2].load(Ordering::Acquire),
            p99_write_us: self.us[3].load(Ordering::Acquire),
        }
    }
}

/// A latency-injecting bdev over a base bdev.
pub struct DelayBdev {
    info: BdevInfo,
    base: BdevDesc,
    seed: u64,
    lat: Arc<Latencies>,
}

impl DelayBdev {
    /// A delay bdev `name` over `base`, drawing latencies from `seed`. EINVAL for a
    /// latency above [`MAX_LATENCY_US`] or a bad name.
    pub fn create(base: BdevDesc, name: &str, latencies: DelayLatencies, seed: u64) -> Result<Arc<DelayBdev>, Errno> {
        Self::create_with_uuid(base, name, latencies, seed, uuid::Uuid::new_v4())
    }

    /// Same, with a given UUID (recreating a saved configuration).
    pub fn create_with_uuid(
        base: BdevDesc,
        name: &str,
        l: DelayLatencies,
        seed: u64,
        uuid: uuid::Uuid,
    ) -> Result<Arc<DelayBdev>, Errno> {
        crate::check_name(name)?;
        if name == base.name() {
            return Err(Errno::EEXIST);
        }
        let all = [l.avg_read_us, l.p99_read_us, l.avg_write_us, l.p99_write_us];
        if all.iter().any(|&v| v > MAX_LATENCY_US) {
            return Err(Errno::EINVAL);
        }
        let mut info = base.bdev().info().clone();
        info.name = name.to_string();
        info.uuid = uuid;
        info.product_name = "Delay disk".into();
        Ok(Arc::new(DelayBdev {
            info,
            base,
            seed,
            lat: Arc::new(Latencies { us: all.map(AtomicU64::new), generation: AtomicU64::new(0) }),
        }))
    }

    /// Change one latency (microseconds) for I/Os submitted from now on, on every reactor.
    pub fn update_latency(&self, kind: LatencyKind, us: u64) -> Result<(), Errno> {
        if us > MAX_LATENCY_US {
            return Err(Errno::EINVAL);
        }
        let i = match kind {
            LatencyKind::AvgRead => 0,
            LatencyKind::P99Read => 1,
            LatencyKind::AvgWrite => 2,
            LatencyKind::P99Write => 3,
        };
        self.lat.us[i].store(us, Ordering::Release);
        self.lat.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    pub fn latencies(&self) -> DelayLatencies {
        self.lat.get()
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn base(&self) -> &BdevDesc {
        &self.base
    }
}

impl Bdev for DelayBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        let base = self.base.bdev().create_channel()?;
        let reactor = reactor::current().unwrap_or(0);
        Ok(Box::new(DelayChannel {
            base,
            lat: self.lat.clone(),
            state: RefCell::new(ChannelState {
                generation: u64::MAX,
                read: LatencyModel::new(0, 0),
                write: LatencyModel::new(0, 0),
                rng: ChaCha8Rng::seed_from_u64(crate::channel_seed(self.seed, reactor)),
            }),
        }))
    }

    fn driver(&self) -> &'static str {
        "delay"
    }

    fn driver_specific(&self) -> serde_json::Value {
        let l = self.latencies();
        serde_json::json!({
            "delay": {
                "name": self.info.name,
                "base_bdev_name": self.base.name(),
                "avg_read_latency": l.avg_read_us,
                "p99_read_latency": l.p99_read_us,
                "avg_write_latency": l.avg_write_us,
                "p99_write_latency": l.p99_write_us,
                "seed": self.seed,
            }
        })
    }

    fn config_call(&self) -> Option<(String, serde_json::Value)> {
        let l = self.latencies();
        Some((
            "bdev_delay_create".into(),
            serde_json::json!({
                "name": self.info.name,
                "base_bdev_name": self.base.name(),
                "avg_read_latency": l.avg_read_us,
                "p99_read_latency": l.p99_read_us,
                "avg_write_latency": l.avg_write_us,
                "p99_write_latency": l.p99_write_us,
                "uuid": self.info.uuid.to_string(),
                "seed": self.seed,
            }),
        ))
    }

    fn base_bdevs(&self) -> Vec<String> {
        vec![self.base.name().to_string()]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

struct ChannelState {
    generation: u64,
    read: LatencyModel,
    write: LatencyModel,
    rng: ChaCha8Rng,
}

/// A delay bdev's channel over the base's channel on the same reactor.
pub struct DelayChannel {
    base: Box<dyn BdevChannel>,
    lat: Arc<Latencies>,
    state: RefCell<ChannelState>,
}

impl BdevChannel for DelayChannel {
    fn submit(&self, io: IoRequest) -> IoFuture {
        let delay = {
            let mut s = self.state.borrow_mut();
            let g = self.lat.generation.load(Ordering::Acquire);
            if s.generation != g {
                let l = self.lat.get();
                s.read = LatencyModel::new(l.avg_read_us, l.p99_read_us);
                s.write = LatencyModel::new(l.avg_write_us, l.p99_write_us);
                s.generation = g;
            }
            let s = &mut *s;
            let model = if io.io_type == IoType::Read { &s.read } else { &s.write };
            if model.is_zero() {
                None
            } else {
                Some(model.sample(&mut s.rng))
            }
        };
        let fut = self.base.submit(io);
        match delay {
            None => fut,
            Some(d) => IoFuture::boxed(async move {
                let c: IoCompletion = fut.await;
                reactor::sleep(d).await;
                c
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(avg: u64, p99: u64, seed: u64) -> (f64, f64) {
        let m = LatencyModel::new(avg, p99);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut v: Vec<f64> = (0..10_000).map(|_| m.sample_us(&mut rng)).collect();
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let p99 = v[(v.len() * 99).div_ceil(100) - 1];
        (mean, p99)
    }

    #[test]
    fn mean_and_p99_of_10k_draws_are_within_10_percent() {
        for seed in [1u64, 2, 3, 0xDEC0DE] {
            for (avg, p99) in [(100, 1000), (100, 100), (50, 60), (1000, 3000), (10, 200), (200, 5000), (1, 5)] {
                println!("seed {seed} avg {avg} p99 {p99}");
                let (mean, q) = stats(avg, p99, seed);
                assert!(
                    (mean - avg as f64).abs() <= 0.1 * avg as f64,
                    "seed {seed}: mean {mean} for avg {avg} (p99 {p99})"
                );
                assert!((q - p99 as f64).abs() <= 0.1 * p99 as f64, "seed {seed}: p99 {q} for p99 {p99} (avg {avg})");
            }
        }
    }

    #[test]
    fn degenerate_parameters_do_not_panic() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (a, p) in [(0, 0), (0, 100), (100, 0), (MAX_LATENCY_US, MAX_LATENCY_US), (1, MAX_LATENCY_US)] {
            let m = LatencyModel::new(a, p);
            for _ in 0..100 {
                let x = m.sample_us(&mut rng);
                assert!(x.is_finite() && x >= 0.0);
            }
        }
        assert!(LatencyModel::new(0, 0).is_zero());
    }
}
