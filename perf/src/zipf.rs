//! Zipf-distributed ranks by rejection-inversion (W. Hörmann and G. Derflinger, "Rejection-
//! inversion to generate variates from monotone discrete distributions", ACM TOMACS 1996).
//!
//! P(k) ∝ 1 / k^θ for k in 1..=n. O(1) setup and O(1) expected time per sample for any
//! θ > 0 (including θ = 1 and θ > 1, which Gray et al.'s method cannot do), no table of
//! size n, and exact rather than approximate frequencies.
//!
//! [`ZipfOffsets`] maps ranks onto the device: rank 1 is the hottest I/O slot, and ranks
//! are scattered over the whole device by a multiplicative bijection so the hot set is not
//! one contiguous run at LBA 0.

use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct Zipf {
    n: f64,
    theta: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    s: f64,
}

impl Zipf {
    /// `n` items (>= 1), exponent `theta` (> 0, finite).
    pub fn new(n: u64, theta: f64) -> Result<Zipf, String> {
        if n == 0 {
            return Err("zipf: need at least one item".into());
        }
        if !(theta.is_finite() && theta > 0.0 && theta <= 100.0) {
            return Err(format!("zipf theta must be in (0, 100], got {theta}"));
        }
        let mut z = Zipf { n: n as f64, theta, h_integral_x1: 0.0, h_integral_n: 0.0, s: 0.0 };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(z.n + 0.5);
        z.s = 2.0 - z.h_integral_inv(z.h_integral(2.5) - z.h(2.0));
        Ok(z)
    }

    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// A rank in 1..=n.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        loop {
            let u = self.h_integral_n + rng.next_f64() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inv(u);
            let mut k = (x + 0.5) as u64; // truncation = floor for x >= 0.5
            if k < 1 {
                k = 1;
            } else if k as f64 > self.n {
                k = self.n as u64;
            }
            let kf = k as f64;
            if kf - x <= self.s || u >= self.h_integral(kf + 0.5) - self.h(kf) {
                return k;
            }
        }
    }

    /// Probability of rank `k` (for tests and docs): 1 / (k^θ · H(n, θ)), O(n).
    pub fn probability(&self, k: u64) -> f64 {
        let h: f64 = (1..=self.n as u64).map(|i| (i as f64).powf(-self.theta)).sum();
        (k as f64).powf(-self.theta) / h
    }

    fn h(&self, x: f64) -> f64 {
        (-self.theta * x.ln()).exp()
    }

    /// ∫ h: ((x^(1-θ)) - 1) / (1-θ), computed stably around θ = 1.
    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper2((1.0 - self.theta) * log_x) * log_x
    }

    fn h_integral_inv(&self, x: f64) -> f64 {
        let mut t = x * (1.0 - self.theta);
        if t < -1.0 {
            t = -1.0; // numerical guard at the lower end
        }
        (helper1(t) * x).exp()
    }
}

/// ln(1+x)/x, accurate near 0.
fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// (e^x - 1)/x, accurate near 0.
fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x * (1.0 / 3.0) * (1.0 + 0.25 * x))
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Zipf over `n` I/O slots, scattered over the device.
#[derive(Clone, Debug)]
pub struct ZipfOffsets {
    zipf: Zipf,
    n: u64,
    mult: u64,
}

impl ZipfOffsets {
    pub fn new(n: u64, theta: f64) -> Result<ZipfOffsets, String> {
        let zipf = Zipf::new(n, theta)?;
        // A multiplier coprime with n makes rank -> (rank * mult) mod n a bijection.
        let mut mult = 0x9E37_79B9_7F4A_7C15u64 % n.max(1);
        if n > 1 {
            mult = mult.max(1);
            while gcd(mult, n) != 1 {
                mult = mult % (n - 1) + 1;
            }
        }
        Ok(ZipfOffsets { zipf, n, mult })
    }

    /// The slot index (0..n) of the next I/O.
    #[inline]
    pub fn next_slot(&self, rng: &mut Rng) -> u64 {
        let rank0 = self.zipf.sample(rng) - 1;
        ((rank0 as u128 * self.mult as u128) % self.n as u128) as u64
    }

    /// The slot that rank `k` (1-based) maps to.
    pub fn slot_of_rank(&self, k: u64) -> u64 {
        (((k - 1) as u128 * self.mult as u128) % self.n as u128) as u64
    }
}
