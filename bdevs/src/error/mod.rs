//! `error`: fault injection over a base bdev (SPDK `bdev_error`, Linux dm-flakey).
//!
//! The error bdev has its base's geometry and forwards every I/O to it unless a rule says
//! otherwise. Its name is `EE_<base>` (SPDK's convention) unless one is given.
//!
//! # Rules
//!
//! [`ErrorBdev::inject`] installs an [`ErrorSpec`]: for one I/O type, or for all of them
//! (`io: None` — then *one* rule counts the I/Os of every type together), inject
//!
//! - [`ErrorKind::Failure`]: the I/O fails with EIO without reaching the base;
//! - [`ErrorKind::NoMem`]: the I/O fails with ENOMEM without reaching the base — a
//!   transient condition the engine's `IoChannel` retries, so the caller sees success once
//!   the rule is exhausted (or ENOMEM after the engine's retry limit);
//! - [`ErrorKind::CorruptData`]: reads complete successfully with the first byte of every
//!   block inverted (XOR 0xFF); writes store data whose first byte of every block is
//!   inverted (the caller's buffer comes back intact). Only for reads and writes.
//!
//! triggered [`Trigger::Once`], [`Trigger::Times`]`(n)` (the next n I/Os), every nth I/O
//! ([`Trigger::EveryNth`]: I/Os n, 2n, 3n, ... counted from the injection, over all reactors),
//! or with probability `p` ([`Trigger::Probability`]). Once/Times/EveryNth use shared atomic
//! counters, so their counts are exact whatever the number of reactors. Probability rules
//! draw from a ChaCha8 RNG per channel seeded with
//! [`channel_seed`](crate::channel_seed)`(seed, reactor index)`: the decisions of one reactor
//! are a deterministic function of the seed and of the order of that reactor's I/Os; the
//! interleaving across reactors is not deterministic. A new rule for a type replaces the
//! old one.
//!
//! # Offline
//!
//! [`ErrorBdev::set_offline`]`(true)` is sticky: every I/O fails with **ENODEV** ("no such
//! device", as if the device vanished), distinct from EIO (an I/O error on a present
//! device) and from ENXIO (which the engine uses for "no reactor / ring gone"). ENODEV is
//! not transient, so nothing retries it. [`ErrorBdev::clear`] removes every rule and brings
//! the device back.
//!
//! # Cost
//!
//! Control calls take a small mutex. The data path reads one atomic: when nothing is
//! injected, the I/O goes straight to the base channel's future (no allocation). With
//! rules installed, a channel re-reads them (under the mutex) only when their generation
//! changed.

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tiercache_engine::bdev::{Bdev, BdevChannel, BdevDesc, BdevInfo, IoCompletion, IoFuture, IoRequest, IoType};
use tiercache_engine::reactor;
use tiercache_engine::{Errno, IoBuf};

/// What an injected error does.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// EIO.
    Failure,
    /// ENOMEM (retried by the engine).
    NoMem,
    /// Reads return, writes store, data with flipped bytes.
    CorruptData,
}

/// When an injected error fires.
#[derive(Copy, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The next I/O.
    Once,
    /// The next n I/Os (n > 0).
    Times(u64),
    /// I/Os n, 2n, 3n, ... from now on (n > 0).
    EveryNth(u64),
    /// Each I/O with probability `p` in [0, 1], from a seeded per-channel RNG.
    Probability { p: f64, seed: u64 },
}

/// One injection rule.
#[derive(Copy, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorSpec {
    /// The I/O type it applies to; `None` = every type, counted together.
    pub io: Option<IoType>,
    pub kind: ErrorKind,
    pub trigger: Trigger,
}

impl ErrorSpec {
    pub fn new(io: Option<IoType>, kind: ErrorKind, trigger: Trigger) -> ErrorSpec {
        ErrorSpec { io, kind, trigger }
    }
}

/// Injected-error counters (since creation or [`ErrorBdev::reset_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ErrorStats {
    /// EIO injected.
    pub failures: u64,
    /// ENOMEM injected (each retry that hits the rule counts).
    pub nomem: u64,
    /// Reads or writes whose data was corrupted.
    pub corrupted: u64,
    /// I/Os failed with ENODEV while offline.
    pub offline: u64,
    /// Injections of any kind per I/O type, indexed like [`IoType::ALL`].
    pub by_type: [u64; 5],
}

fn type_index(t: IoType) -> usize {
    IoType::ALL.iter().position(|x| *x == t).unwrap_or(0)
}

const OFFLINE_BIT: u32 = 1 << 5;

/// An installed rule with its shared counters.
struct Rule {
    id: u64,
    spec: ErrorSpec,
    /// Once/Times: injections left.
    remaining: AtomicU64,
    /// EveryNth: I/Os seen.
    seen: AtomicU64,
}

impl Rule {
    /// Whether this I/O gets the error (shared-counter triggers only).
    fn fires_shared(&self) -> bool {
        match self.spec.trigger {
            Trigger::Once | Trigger::Times(_) => {
                self.remaining.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1)).is_ok()
            }
            Trigger::EveryNth(n) => (self.seen.fetch_add(1, Ordering::AcqRel) + 1).is_multiple_of(n.max(1)),
            Trigger::Probability { .. } => false,
        }
    }
}

#[derive(Default)]
struct Counters {
    failures: AtomicU64,
    nomem: AtomicU64,
    corrupted: AtomicU64,
    offline: AtomicU64,
    by_type: [AtomicU64; 5],
}

/// State shared by the bdev (control) and its channels (data path).
struct Control {
    /// Bit i: a rule for `IoType::ALL[i]`; `OFFLINE_BIT`: offline. Zero = pass through.
    flags: AtomicU32,
    /// Bumped on every rule change; channels refresh their copy when it moves.
    generation: AtomicU64,
    rules: Mutex<[Option<Arc<Rule>>; 5]>,
    next_id: AtomicU64,
    counters: Counters,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, [Option<Arc<Rule>>; 5]> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Recompute `flags` from the rules (with the lock held) and publish a new generation.
    fn publish(&self, rules: &[Option<Arc<Rule>>; 5]) {
        let mut f = self.flags.load(Ordering::Acquire) & OFFLINE_BIT;
        for (i, r) in rules.iter().enumerate() {
            if r.is_some() {
                f |= 1 << i;
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.flags.store(f, Ordering::Release);
    }
}

/// A fault-injecting bdev over a base bdev.
pub struct ErrorBdev {
    info: BdevInfo,
    base: BdevDesc,
    custom_name: bool,
    control: Arc<Control>,
}

impl ErrorBdev {
    /// An error bdev over `base`, named `name` or `EE_<base name>`.
    pub fn create(base: BdevDesc, name: Option<&str>) -> Result<Arc<ErrorBdev>, Errno> {
        Self::create_with_uuid(base, name, uuid::Uuid::new_v4())
    }

    /// Same, with a given UUID (recreating a saved configuration).
    pub fn create_with_uuid(base: BdevDesc, name: Option<&str>, uuid: uuid::Uuid) -> Result<Arc<ErrorBdev>, Errno> {
        let name = match name {
            Some(n) => n.to_string(),
            None => format!("EE_{}", base.name()),
        };
        crate::check_name(&name)?;
        if name == base.name() {
            return Err(Errno::EEXIST);
        }
        let mut info = base.bdev().info().clone();
        info.name = name.clone();
        info.uuid = uuid;
        info.product_name = "Error disk".into();
        Ok(Arc::new(ErrorBdev {
            custom_name: name != format!("EE_{}", base.name()),
            info,
            base,
            control: Arc::new(Control {
                flags: AtomicU32::new(0),
                generation: AtomicU64::new(0),
                rules: Mutex::new(Default::default()),
                next_id: AtomicU64::new(1),
                counters: Counters::default(),
            }),
        }))
    }

    /// Install a rule (replacing the rule of the same type(s)). EINVAL for `Times(0)`,
    /// `EveryNth(0)`, a probability outside [0, 1], or data corruption of an I/O type that
    /// carries no data.
    pub fn inject(&self, spec: ErrorSpec) -> Result<(), Errno> {
        match spec.trigger {
            Trigger::Times(0) | Trigger::EveryNth(0) => return Err(Errno::EINVAL),
            Trigger::Probability { p, .. } if !(0.0..=1.0).contains(&p) => return Err(Errno::EINVAL),
            _ => {}
        }
        if spec.kind == ErrorKind::CorruptData
            && matches!(spec.io, Some(t) if !matches!(t, IoType::Read | IoType::Write))
        {
            return Err(Errno::EINVAL);
        }
        let remaining = match spec.trigger {
            Trigger::Once => 1,
            Trigger::Times(n) => n,
            _ => 0,
        };
        let rule = Arc::new(Rule {
            id: self.control.next_id.fetch_add(1, Ordering::Relaxed),
            spec,
            remaining: AtomicU64::new(remaining),
            seen: AtomicU64::new(0),
        });
        let mut rules = self.control.lock();
        match spec.io {
            Some(t) => rules[type_index(t)] = Some(rule),
            None => rules.iter_mut().for_each(|r| *r = Some(rule.clone())),
        }
        self.control.publish(&rules);
        log::info!("{}: injecting {:?}", self.info.name, spec);
        Ok(())
    }

    /// Sticky "device vanished": every I/O fails with ENODEV while set.
    pub fn set_offline(&self, offline: bool) {
        let rules = self.control.lock();
        if offline {
            self.control.flags.fetch_or(OFFLINE_BIT, Ordering::AcqRel);
        } else {
            self.control.flags.fetch_and(!OFFLINE_BIT, Ordering::AcqRel);
        }
        self.control.publish(&rules);
        log::info!("{}: {}", self.info.name, if offline { "offline (I/O fails with ENODEV)" } else { "online" });
    }

    pub fn is_offline(&self) -> bool {
        self.control.flags.load(Ordering::Acquire) & OFFLINE_BIT != 0
    }

    /// Remove every rule and go back online.
    pub fn clear(&self) {
        let mut rules = self.control.lock();
        *rules = Default::default();
        self.control.flags.store(0, Ordering::Release);
        self.control.publish(&rules);
    }

    /// The rules in force, per I/O type (indexed like [`IoType::ALL`]), with what is left
    /// of Once/Times triggers.
    pub fn rules(&self) -> Vec<(IoType, ErrorSpec, u64)> {
        let rules = self.control.lock();
        IoType::ALL
            .iter()
            .zip(rules.iter())
            .filter_map(|(t, r)| r.as_ref().map(|r| (*t, r.spec, r.remaining.load(Ordering::Acquire))))
            .collect()
    }

    pub fn stats(&self) -> ErrorStats {
        let c = &self.control.counters;
        let mut by_type = [0; 5];
        for (o, a) in by_type.iter_mut().zip(c.by_type.iter()) {
            *o = a.load(Ordering::Relaxed);
        }
        ErrorStats {
            failures: c.failures.load(Ordering::Relaxed),
            nomem: c.nomem.load(Ordering::Relaxed),
            corrupted: c.corrupted.load(Ordering::Relaxed),
            offline: c.offline.load(Ordering::Relaxed),
            by_type,
        }
    }

    pub fn reset_stats(&self) {
        let c = &self.control.counters;
        for a in [&c.failures, &c.nomem, &c.corrupted, &c.offline].into_iter().chain(c.by_type.iter()) {
            a.store(0, Ordering::Relaxed);
        }
    }

    pub fn base(&self) -> &BdevDesc {
        &self.base
    }
}

impl Bdev for ErrorBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        // The base's own channel: requests reaching us were validated against our info,
        // which is the base's geometry, so they are valid for the base too.
        let base = self.base.bdev().create_channel()?;
        Ok(Box::new(ErrorChannel {
            base,
            info: self.info.clone(),
            control: self.control.clone(),
            reactor: reactor::current().unwrap_or(0),
            cache: RefCell::new(Cache { generation: u64::MAX, rules: Default::default(), rngs: Vec::new() }),
        }))
    }

    fn driver(&self) -> &'static str {
        "error"
    }

    fn driver_specific(&self) -> serde_json::Value {
        let rules: Vec<_> = self
            .rules()
            .into_iter()
            .map(|(t, spec, left)| serde_json::json!({ "io_type": t.name(), "spec": spec, "remaining": left }))
            .collect();
        serde_json::json!({
            "error": {
                "base_bdev": self.base.name(),
                "offline": self.is_offline(),
                "rules": rules,
                "stats": self.stats(),
            }
        })
    }

    fn config_call(&self) -> Option<(String, serde_json::Value)> {
        let mut p = serde_json::json!({ "base_name": self.base.name(), "uuid": self.info.uuid.to_string() });
        if self.custom_name {
            p["name"] = serde_json::json!(self.info.name);
        }
        Some(("bdev_error_create".into(), p))
    }

    fn base_bdevs(&self) -> Vec<String> {
        vec![self.base.name().to_string()]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A channel's copy of the rules.
struct Cache {
    generation: u64,
    rules: [Option<Arc<Rule>>; 5],
    /// One RNG per probability rule, by rule id.
    rngs: Vec<(u64, ChaCha8Rng)>,
}

/// An error bdev's channel over the base's channel on the same reactor.
pub struct ErrorChannel {
    base: Box<dyn BdevChannel>,
    info: BdevInfo,
    control: Arc<Control>,
    reactor: usize,
    cache: RefCell<Cache>,
}

/// What to do with one I/O.
enum Verdict {
    Pass,
    Fail(Errno),
    Corrupt,
}

impl ErrorChannel {
    fn decide(&self, t: IoType, flags: u32) -> Verdict {
        let c = &self.control.counters;
        if flags & OFFLINE_BIT != 0 {
            c.offline.fetch_add(1, Ordering::Relaxed);
            return Verdict::Fail(Errno::ENODEV);
        }
        let idx = type_index(t);
        if flags & (1 << idx) == 0 {
            return Verdict::Pass;
        }
        let mut cache = self.cache.borrow_mut();
        let generation = self.control.generation.load(Ordering::Acquire);
        if cache.generation != generation {
            let rules = self.control.lock();
            cache.rules = rules.clone();
            cache.generation = self.control.generation.load(Ordering::Acquire);
            drop(rules);
            let live: Vec<u64> = cache.rules.iter().flatten().map(|r| r.id).collect();
            cache.rngs.retain(|(id, _)| live.contains(id));
        }
        let Some(rule) = cache.rules[idx].clone() else { return Verdict::Pass };
        let corrupt = rule.spec.kind == ErrorKind::CorruptData;
        if corrupt && !matches!(t, IoType::Read | IoType::Write) {
            return Verdict::Pass; // an "all" corruption rule ignores dataless I/O
        }
        let fires = match rule.spec.trigger {
            Trigger::Probability { p, seed } => {
                let reactor = self.reactor;
                let rng = match cache.rngs.iter().position(|(id, _)| *id == rule.id) {
                    Some(i) => &mut cache.rngs[i].1,
                    None => {
                        cache.rngs.push((rule.id, ChaCha8Rng::seed_from_u64(crate::channel_seed(seed, reactor))));
                        let last = cache.rngs.len() - 1;
                        &mut cache.rngs[last].1
                    }
                };
                rng.gen::<f64>() < p
            }
            _ => rule.fires_shared(),
        };
        if !fires {
            return Verdict::Pass;
        }
        c.by_type[idx].fetch_add(1, Ordering::Relaxed);
        match rule.spec.kind {
            ErrorKind::Failure => {
                c.failures.fetch_add(1, Ordering::Relaxed);
                Verdict::Fail(Errno::EIO)
            }
            ErrorKind::NoMem => {
                c.nomem.fetch_add(1, Ordering::Relaxed);
                Verdict::Fail(Errno::ENOMEM)
            }
            ErrorKind::CorruptData => {
                c.corrupted.fetch_add(1, Ordering::Relaxed);
                Verdict::Corrupt
            }
        }
    }
}

/// Invert the first byte of every block of `buf` (an involution: applying it twice restores
/// the data).
pub fn corrupt_blocks(buf: &mut [u8], block_size: u32) {
    for block in buf.chunks_mut(block_size.max(1) as usize) {
        block[0] ^= 0xFF;
    }
}

impl BdevChannel for ErrorChannel {
    fn submit(&self, mut io: IoRequest) -> IoFuture {
        let flags = self.control.flags.load(Ordering::Acquire);
        if flags == 0 {
            return self.base.submit(io);
        }
        if let Err(e) = crate::check_request(&self.info, &io) {
            return IoFuture::ready(IoCompletion::err(e, io.buf));
        }
        match self.decide(io.io_type, flags) {
            Verdict::Pass => self.base.submit(io),
            Verdict::Fail(e) => IoFuture::ready(IoCompletion::err(e, io.buf)),
            Verdict::Corrupt => {
                let bs = self.info.block_size;
                let is_write = io.io_type == IoType::Write;
                if is_write {
                    if let Some(b) = io.buf.as_mut() {
                        corrupt_blocks(b, bs);
                    }
                }
                let fut = self.base.submit(io);
                IoFuture::boxed(async move {
                    let mut c = fut.await;
                    // Writes: give the caller its data back intact. Reads: corrupt what came.
                    if is_write || c.status.is_ok() {
                        if let Some(b) = c.buf.as_mut() {
                            flip(b, bs);
                        }
                    }
                    c
                })
            }
        }
    }
}

fn flip(b: &mut IoBuf, bs: u32) {
    corrupt_blocks(b, bs);
}
