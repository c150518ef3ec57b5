//! The cached target (`--cache FILE --backing FILE`): a uring bdev on each file, the
//! backing one optionally behind a delay bdev (an HDD stand-in), a cache set formatted on
//! (or loaded from) the cache file, the backing device attached, and the run on the
//! resulting cached bdev.
//!
//! Cache counters come from the device boundary: both devices are wrapped in a
//! [`CountingBdev`] that counts what the engine submits to them (per channel, written by
//! its reactor only). Hits and misses follow from the reads the generator issued and the
//! reads that reached the backing device (writeback never reads the backing device);
//! writeback blocks are the blocks written to the backing device; segments written are the
//! cache device writes in the log area (superblock updates sit below it).

use std::any::Any;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tiercache_bdevs::delay::{DelayBdev, DelayLatencies};
use tiercache_bdevs::malloc::MallocBdev;
use tiercache_bdevs::uring::UringBdev;
use tiercache_engine::bdev::{Bdev, BdevChannel, BdevDesc, BdevInfo, IoFuture, IoRequest, IoType};
use tiercache_engine::cache::index::SegmentId;
use tiercache_engine::cache::tail_guard::GuardState;
use tiercache_engine::cache::{self, CacheMode, CacheOptions, CacheSet, CachedBdev};
use tiercache_engine::reactor::ReactorSet;
use tiercache_engine::Errno;

/// What `--cache` asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedSpec {
    pub cache_path: PathBuf,
    pub backing_path: PathBuf,
    /// (avg, p99) microseconds injected on every backing I/O.
    pub backing_delay_us: Option<(u64, u64)>,
    /// Format the cache file (destroys its contents) instead of loading it.
    pub format: bool,
    pub segment_size: u32,
    pub mode: CacheMode,
    /// Cache block size (the cached bdev's block size).
    pub block_size: u32,
    /// `CacheOptions::promote_after` (None: the engine's default).
    pub promote_after: Option<u32>,
    /// `CacheOptions::seq_cutoff_bytes` (None: the engine's default).
    pub seq_cutoff: Option<u64>,
    /// `CacheOptions::writeback_free_low_percent` (None: the engine's default).
    pub writeback_low_pct: Option<u32>,
    /// `CacheOptions::writeback_percent` (None: the engine's default).
    pub writeback_percent: Option<u32>,
    /// `CacheOptions::dirty_write_cutoff_percent` (None: the engine's default).
    pub dirty_cutoff_pct: Option<u32>,
    /// I/Os of the job's workload run unmeasured before it (`--prefill-ios`).
    pub prefill_ios: Option<u64>,
    /// An extra reactor on this core runs writeback and reclaim (no job I/O).
    pub migration_core: Option<usize>,
    pub drain: Drain,
}

/// When to ask the set for a full writeback (`CacheSet::request_drain`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Drain {
    No,
    /// After the job, timed until no dirty block is left.
    After,
    /// When the job starts (writeback runs under the job's I/O).
    During,
}

impl CachedSpec {
    /// `--cache malloc:SIZE`: the cache device is a RAM bdev of SIZE bytes (None: a file).
    pub fn cache_malloc_bytes(&self) -> Result<Option<u64>, String> {
        let Some(size) = self.cache_path.to_str().and_then(|p| p.strip_prefix("malloc:")) else { return Ok(None) };
        let bytes = crate::size::parse_size(size).map_err(|e| format!("--cache malloc:SIZE: {e}"))?;
        if bytes == 0 || bytes % self.block_size as u64 != 0 {
            return Err(format!("--cache malloc:{size}: the size must be a non-zero multiple of {}", self.block_size));
        }
        Ok(Some(bytes))
    }

    /// The set's options for this spec; `job_reactors` run the job (a migration reactor,
    /// if any, comes after them).
    pub fn options(&self, job_reactors: usize) -> CacheOptions {
        let d = CacheOptions::default();
        CacheOptions {
            segment_size: self.segment_size,
            block_size: self.block_size,
            promote_after: self.promote_after.unwrap_or(d.promote_after),
            seq_cutoff_bytes: self.seq_cutoff.unwrap_or(d.seq_cutoff_bytes),
            writeback_free_low_percent: self.writeback_low_pct.unwrap_or(d.writeback_free_low_percent),
            writeback_percent: self.writeback_percent.unwrap_or(d.writeback_percent),
            dirty_write_cutoff_percent: self.dirty_cutoff_pct.unwrap_or(d.dirty_write_cutoff_percent),
            migration_reactor: self.migration_core.map(|_| job_reactors),
            ..d
        }
    }
}

/// The engine's own counters (`CacheSet::counters`), deltas over the measured job. Reads
/// are counted per request (a 4 KiB request is one block).
#[derive(Copy, Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct EngineCounters {
    pub read_hits: u64,
    pub read_partial_hits: u64,
    pub read_misses: u64,
    pub promotions: u64,
    pub promotions_stale: u64,
    pub promotions_skipped: u64,
    pub copy_forwards: u64,
    pub copy_forwards_dropped: u64,
    pub seq_bypasses: u64,
    pub full_bypasses: u64,
    pub write_blocks: u64,
    pub segments_written: u64,
    pub writeback_blocks: u64,
    pub segments_reclaimed: u64,
    pub space_waits: u64,
    pub flushes: u64,
}

impl EngineCounters {
    fn of(set: &CacheSet) -> EngineCounters {
        let c = &set.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineCounters {
            read_hits: g(&c.read_hits),
            read_partial_hits: g(&c.read_partial_hits),
            read_misses: g(&c.read_misses),
            promotions: g(&c.promotions),
            promotions_stale: g(&c.promotions_stale),
            promotions_skipped: g(&c.promotions_skipped),
            copy_forwards: g(&c.copy_forwards),
            copy_forwards_dropped: g(&c.copy_forwards_dropped),
            seq_bypasses: g(&c.seq_bypasses),
            full_bypasses: g(&c.full_bypasses),
            write_blocks: g(&c.write_blocks),
            segments_written: g(&c.segments_written),
            writeback_blocks: g(&c.writeback_blocks),
            segments_reclaimed: g(&c.segments_reclaimed),
            space_waits: g(&c.space_waits),
            flushes: g(&c.flushes),
        }
    }

    fn minus(&self, b: &EngineCounters) -> EngineCounters {
        EngineCounters {
            read_hits: self.read_hits - b.read_hits,
            read_partial_hits: self.read_partial_hits - b.read_partial_hits,
            read_misses: self.read_misses - b.read_misses,
            promotions: self.promotions - b.promotions,
            promotions_stale: self.promotions_stale - b.promotions_stale,
            promotions_skipped: self.promotions_skipped - b.promotions_skipped,
            copy_forwards: self.copy_forwards - b.copy_forwards,
            copy_forwards_dropped: self.copy_forwards_dropped - b.copy_forwards_dropped,
            seq_bypasses: self.seq_bypasses - b.seq_bypasses,
            full_bypasses: self.full_bypasses - b.full_bypasses,
            write_blocks: self.write_blocks - b.write_blocks,
            segments_written: self.segments_written - b.segments_written,
            writeback_blocks: self.writeback_blocks - b.writeback_blocks,
            segments_reclaimed: self.segments_reclaimed - b.segments_reclaimed,
            space_waits: self.space_waits - b.space_waits,
            flushes: self.flushes - b.flushes,
        }
    }

    /// Percent of read requests fully served by the cache (None without reads).
    pub fn hit_pct(&self) -> Option<f64> {
        let all = self.read_hits + self.read_partial_hits + self.read_misses;
        (all > 0).then(|| round3(self.read_hits as f64 / all as f64 * 100.0))
    }
}

/// The `drain` section of the report.
#[derive(Clone, Debug, Serialize)]
pub struct DrainReport {
    pub when: Drain,
    pub dirty_blocks_before: u64,
    pub dirty_blocks_after: u64,
    /// Blocks written back to the backing device meanwhile (device boundary).
    pub written_back_blocks: u64,
    /// After: seconds from `request_drain` until no dirty block was left. During: the job's
    /// elapsed time.
    pub secs: f64,
    pub mib_per_s: f64,
    /// What the devices saw meanwhile (writeback reads, backing writes and flushes, the
    /// durability rounds' cache flushes and superblock writes).
    pub cache_dev: DevCounts,
    pub backing_dev: DevCounts,
}

/// I/O counts of one device (or one channel of it).
#[derive(Copy, Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct DevCounts {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    /// Writes that start at or above `log_start` (segment writes on a cache device).
    pub log_writes: u64,
    pub flushes: u64,
    /// Unmap and write-zeroes requests.
    pub zeroes: u64,
    pub zero_bytes: u64,
}

impl DevCounts {
    fn minus(&self, b: &DevCounts) -> DevCounts {
        DevCounts {
            reads: self.reads - b.reads,
            read_bytes: self.read_bytes - b.read_bytes,
            writes: self.writes - b.writes,
            write_bytes: self.write_bytes - b.write_bytes,
            log_writes: self.log_writes - b.log_writes,
            flushes: self.flushes - b.flushes,
            zeroes: self.zeroes - b.zeroes,
            zero_bytes: self.zero_bytes - b.zero_bytes,
        }
    }
}

/// One channel's counters: written only by the reactor that owns the channel (plain
/// load + store, no locked instruction), read by the main thread after the run.
#[repr(align(128))]
#[derive(Default)]
struct ChanCounts([AtomicU64; 8]);

impl ChanCounts {
    #[inline]
    fn bump(&self, i: usize, by: u64) {
        let c = &self.0[i];
        c.store(c.load(Ordering::Relaxed) + by, Ordering::Relaxed);
    }

    fn get(&self) -> DevCounts {
        let v: Vec<u64> = self.0.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        DevCounts {
            reads: v[0],
            read_bytes: v[1],
            writes: v[2],
            write_bytes: v[3],
            log_writes: v[4],
            flushes: v[5],
            zeroes: v[6],
            zero_bytes: v[7],
        }
    }
}

/// A pass-through bdev that counts the requests submitted to `inner`. The inner future is
/// returned as is (no boxing, no extra allocation).
pub struct CountingBdev {
    inner: Arc<dyn Bdev>,
    /// Byte offset from which a write counts as a log (segment) write (shared with the
    /// channels: the cache set opens its channel before the geometry is known here).
    log_start: Arc<AtomicU64>,
    channels: Mutex<Vec<Arc<ChanCounts>>>,
}

impl CountingBdev {
    pub fn new(inner: Arc<dyn Bdev>) -> Arc<CountingBdev> {
        Arc::new(CountingBdev {
            inner,
            log_start: Arc::new(AtomicU64::new(u64::MAX)),
            channels: Mutex::new(Vec::new()),
        })
    }

    pub fn set_log_start(&self, offset: u64) {
        self.log_start.store(offset, Ordering::Relaxed);
    }

    /// Sum over every channel ever opened.
    pub fn counts(&self) -> DevCounts {
        let chans = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        chans.iter().map(|c| c.get()).fold(DevCounts::default(), |a, b| DevCounts {
            reads: a.reads + b.reads,
            read_bytes: a.read_bytes + b.read_bytes,
            writes: a.writes + b.writes,
            write_bytes: a.write_bytes + b.write_bytes,
            log_writes: a.log_writes + b.log_writes,
            flushes: a.flushes + b.flushes,
            zeroes: a.zeroes + b.zeroes,
            zero_bytes: a.zero_bytes + b.zero_bytes,
        })
    }

    pub fn inner(&self) -> &Arc<dyn Bdev> {
        &self.inner
    }
}

struct CountingChannel {
    inner: Box<dyn BdevChannel>,
    counts: Arc<ChanCounts>,
    log_start: Arc<AtomicU64>,
}

impl Bdev for CountingBdev {
    fn info(&self) -> &BdevInfo {
        self.inner.info()
    }

    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        let counts = Arc::new(ChanCounts::default());
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).push(counts.clone());
        Ok(Box::new(CountingChannel { inner: self.inner.create_channel()?, counts, log_start: self.log_start.clone() }))
    }

    fn driver(&self) -> &'static str {
        self.inner.driver()
    }

    fn driver_specific(&self) -> serde_json::Value {
        self.inner.driver_specific()
    }

    fn base_bdevs(&self) -> Vec<String> {
        vec![self.inner.info().name.clone()]
    }

    fn shutdown(&self) {
        self.inner.shutdown()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BdevChannel for CountingChannel {
    fn submit(&self, io: IoRequest) -> IoFuture {
        let c = &self.counts;
        match io.io_type {
            IoType::Read => {
                c.bump(0, 1);
                c.bump(1, io.len);
            }
            IoType::Write => {
                c.bump(2, 1);
                c.bump(3, io.len);
                if io.offset >= self.log_start.load(Ordering::Relaxed) {
                    c.bump(4, 1);
                }
            }
            IoType::Flush => c.bump(5, 1),
            IoType::Unmap | IoType::WriteZeroes => {
                c.bump(6, 1);
                c.bump(7, io.len);
            }
        }
        self.inner.submit(io)
    }
}

/// Index RAM, from `BlockIndex::memory_usage()`.
#[derive(Clone, Debug, Serialize)]
pub struct IndexRam {
    pub slots: u64,
    /// Bytes of the per-slot arrays (buckets, keys, chain links) — the engine's
    /// `per_slot_bytes`, which is the total of those arrays, not a per-slot figure.
    pub slot_arrays_bytes: u64,
    /// Bytes of the segment table.
    pub segment_table_bytes: u64,
    pub bytes_per_slot: f64,
    /// Per cached 4 KiB of data.
    pub bytes_per_cached_4k: f64,
}

/// Counters of the run (deltas over the measured job; setup and the final FLUSH excluded).
#[derive(Clone, Debug, Serialize)]
pub struct CacheCounters {
    /// Blocks read by the generator that were served by the cache (RAM or cache device).
    pub read_hit_blocks: u64,
    /// Blocks read by the generator that went to the backing device.
    pub read_miss_blocks: u64,
    /// Percent of read blocks served by the cache (null without reads).
    pub hit_pct: Option<f64>,
    /// Log segments written to the cache device (one per seal).
    pub segments_written: u64,
    /// Average blocks per segment written (log fill at seal time).
    pub blocks_per_segment_write: Option<f64>,
    /// Blocks copied to the backing device by writeback (writes + write-zeroes).
    pub writeback_blocks: u64,
    /// Cache blocks read from the cache device (read hits not in RAM, plus writeback reads).
    pub cache_dev_read_blocks: u64,
    pub cache_dev: DevCounts,
    pub backing_dev: DevCounts,
}

/// The `cache` section of the report.
#[derive(Clone, Debug, Serialize)]
pub struct CacheReport {
    pub cache_file: String,
    pub backing_file: String,
    pub mode: &'static str,
    /// "format" or "load".
    pub opened_by: &'static str,
    /// Seconds to format (or load) the set and attach the backing device.
    pub setup_s: f64,
    pub backing_delay_us: Option<[u64; 2]>,
    pub block_size: u32,
    pub segment_size: u32,
    pub nr_segments: u32,
    pub counters: CacheCounters,
    /// State after the final FLUSH.
    pub free_segments: usize,
    pub dirty_blocks: u64,
    pub writeback_seq: u64,
    /// The FLUSH issued after the job so the cache can be loaded later (not measured).
    pub final_flush_ms: f64,
    pub index_ram: IndexRam,
    /// The engine's counters over the job (`CacheSet::counters`).
    pub engine: EngineCounters,
    /// Engine read hit ratio in percent (full hits / read requests; null without reads).
    pub engine_hit_pct: Option<f64>,
    /// Live (newest-version) blocks in the log after the job: what the cache held.
    pub cached_blocks: u64,
    pub drain: Option<DrainReport>,
    /// The writeback rate controller's decision at the end of the job (Debug form).
    pub writeback_decision: String,
    /// The writeback tail guard at the end of the job: window, pace, baseline and the
    /// decisions of the intervals closed during the job.
    pub tail_guard: serde_json::Value,
    /// The engine's per-path latency over the job (`CacheSet::latency`, µs: read hit, read
    /// miss, write, bypass, writeback I/O).
    pub path_latency_us: serde_json::Value,
}

/// An open cached target.
pub struct CachedTarget {
    pub spec: CachedSpec,
    pub bdev: Arc<CachedBdev>,
    pub set: Arc<CacheSet>,
    cache_dev: Arc<CountingBdev>,
    backing_dev: Arc<CountingBdev>,
    /// The uring bdevs, shut down at the end.
    files: Vec<Arc<dyn Bdev>>,
    setup: Duration,
    start: Option<(DevCounts, DevCounts)>,
    end: Option<(DevCounts, DevCounts)>,
    engine_start: EngineCounters,
    engine_end: Option<EngineCounters>,
    cached_blocks: u64,
    decision: String,
    guard_start: Option<GuardState>,
    guard_end: Option<GuardState>,
    path_latency: serde_json::Value,
    drain_start: Option<(Instant, u64, DevCounts, DevCounts)>,
    drain: Option<DrainReport>,
}

/// Seed of the delay bdev's latency draws (derived from the run's seed).
fn delay_seed(seed: u64) -> u64 {
    crate::rng::mix(&[seed, 0xde1a7])
}

impl CachedTarget {
    /// Open both files, stack the delay bdev, format or load the set on reactor 0 and attach
    /// the backing device.
    pub fn open(spec: &CachedSpec, reactors: &ReactorSet, seed: u64) -> Result<CachedTarget, String> {
        let cache_file: Arc<dyn Bdev> = match spec.cache_malloc_bytes()? {
            // A RAM cache device: a fast device apart from the backing one (as NVMe in
            // front of an HDD), so writeback is measured against the backing device alone.
            Some(bytes) => MallocBdev::create("perf-cache0", bytes / spec.block_size as u64, spec.block_size)
                .map_err(|e| format!("cannot create a {bytes}-byte malloc cache device: {e}"))?,
            None => UringBdev::create("perf-cache0", &spec.cache_path, None)
                .map_err(|e| format!("cannot open {} as a uring bdev: {e}", spec.cache_path.display()))?,
        };
        let backing_file: Arc<dyn Bdev> = UringBdev::create("perf-backing0", &spec.backing_path, None)
            .map_err(|e| format!("cannot open {} as a uring bdev: {e}", spec.backing_path.display()))?;
        let backing: Arc<dyn Bdev> = match spec.backing_delay_us {
            Some((avg, p99)) => {
                let l = DelayLatencies { avg_read_us: avg, p99_read_us: p99, avg_write_us: avg, p99_write_us: p99 };
                DelayBdev::create(BdevDesc::new(backing_file.clone()), "perf-backing-delay0", l, delay_seed(seed))
                    .map_err(|e| format!("cannot create the delay bdev over {}: {e}", spec.backing_path.display()))?
            }
            None => backing_file.clone(),
        };
        let cache_dev = CountingBdev::new(cache_file.clone());
        let backing_dev = CountingBdev::new(backing);
        let opts = spec.options(reactors.len() - usize::from(spec.migration_core.is_some()));
        let (format, mode) = (spec.format, spec.mode);
        let rs = reactors.clone();
        let (cdesc, bdesc) = (BdevDesc::new(cache_dev.clone()), BdevDesc::new(backing_dev.clone()));
        let cache_name = spec.cache_path.display().to_string();
        let t0 = Instant::now();
        let built = reactors
            .block_on(0, move || async move {
                let set = if format {
                    cache::format("perf-cacheset0", cdesc, rs, opts).await
                } else {
                    cache::load("perf-cacheset0", cdesc, rs, opts).await
                };
                let set = set.map_err(|e| {
                    if format {
                        format!("cannot format {cache_name} as a cache set: {e}")
                    } else {
                        format!("cannot load the cache set on {cache_name}: {e} (use --cache-format to create one)")
                    }
                })?;
                match set.attach(bdesc, mode).await {
                    Ok(b) => Ok((set, b)),
                    Err(e) => {
                        set.stop_migration();
                        Err(format!("cannot attach the backing device: {e}"))
                    }
                }
            })
            .map_err(|_| "reactor 0 stopped while the cache set was being opened".to_string())?;
        let (set, backing) = match built {
            Ok(x) => x,
            Err(e) => {
                cache_file.shutdown();
                backing_file.shutdown();
                return Err(e);
            }
        };
        let setup = t0.elapsed();
        // Channels opened from now on count writes at or above segment 0 as log writes
        // (the cache set opens its per-reactor log channels on first I/O).
        cache_dev.set_log_start(set.geometry().segment_offset(SegmentId(0)));
        let bdev = CachedBdev::new("perf-cached0", set.clone(), backing);
        Ok(CachedTarget {
            spec: spec.clone(),
            bdev,
            set,
            cache_dev,
            backing_dev,
            files: vec![cache_file, backing_file],
            setup,
            start: None,
            end: None,
            engine_start: EngineCounters::default(),
            engine_end: None,
            cached_blocks: 0,
            decision: String::new(),
            guard_start: None,
            guard_end: None,
            path_latency: serde_json::Value::Null,
            drain_start: None,
            drain: None,
        })
    }

    /// The tail guard at the end of the job, with the decisions of the job's intervals.
    fn guard_json(&self) -> serde_json::Value {
        let Some(mut g) = self.guard_end else { return serde_json::Value::Null };
        if let Some(start) = self.guard_start {
            g.decisions = g.decisions.since(start.decisions);
        }
        g.to_json()
    }

    /// Live and dirty blocks over every segment.
    fn live_dirty(&self) -> (u64, u64) {
        (0..self.set.nr_segments())
            .filter_map(|s| self.set.index().segment_info(SegmentId(s)).ok())
            .fold((0, 0), |(l, d), i| (l + i.live as u64, d + i.dirty as u64))
    }

    /// Mark the start of the measured job (and start the drain of `--drain-during`).
    pub fn job_started(&mut self) {
        self.start = Some((self.cache_dev.counts(), self.backing_dev.counts()));
        self.engine_start = EngineCounters::of(&self.set);
        self.guard_start = Some(self.set.tail_guard_state());
        let set = self.set.clone();
        let _ = self.set.reactors().block_on(0, move || async move { set.reset_latency().await });
        if self.spec.drain == Drain::During {
            self.drain_start =
                Some((Instant::now(), self.set.dirty_blocks(), self.cache_dev.counts(), self.backing_dev.counts()));
            self.set.request_drain();
        }
    }

    /// Mark the end of the measured job.
    pub fn job_ended(&mut self) {
        self.end = Some((self.cache_dev.counts(), self.backing_dev.counts()));
        self.engine_end = Some(EngineCounters::of(&self.set));
        self.cached_blocks = self.live_dirty().0;
        self.decision = format!("{:?}", self.set.writeback_rate());
        self.guard_end = Some(self.set.tail_guard_state());
        let set = self.set.clone();
        self.path_latency = self
            .set
            .reactors()
            .block_on(0, move || async move { set.latency().await.summary() })
            .unwrap_or(serde_json::Value::Null);
        if let Some((t0, before, c0, b0)) = self.drain_start.take() {
            self.drain = Some(self.drain_report(Drain::During, t0.elapsed(), before, &c0, &b0));
        }
    }

    fn drain_report(&self, when: Drain, took: Duration, before: u64, c0: &DevCounts, b0: &DevCounts) -> DrainReport {
        let b = self.backing_dev.counts().minus(b0);
        let c = self.cache_dev.counts().minus(c0);
        let bytes = b.write_bytes + b.zero_bytes;
        let secs = took.as_secs_f64();
        DrainReport {
            when,
            dirty_blocks_before: before,
            dirty_blocks_after: self.set.dirty_blocks(),
            written_back_blocks: bytes / self.set.block_size() as u64,
            secs: round3(secs),
            mib_per_s: if secs > 0.0 { round3(bytes as f64 / secs / (1 << 20) as f64) } else { 0.0 },
            cache_dev: c,
            backing_dev: b,
        }
    }

    /// `--drain`: ask for a full writeback and wait (polling every millisecond, at most
    /// `limit`) until no dirty block is left.
    pub fn drain_after(&mut self, limit: Duration) -> Result<(), String> {
        let before = self.set.dirty_blocks();
        let (c0, b0) = (self.cache_dev.counts(), self.backing_dev.counts());
        let t0 = Instant::now();
        self.set.request_drain();
        while self.set.dirty_blocks() > 0 {
            if t0.elapsed() > limit {
                return Err(format!(
                    "drain: {} of {before} dirty blocks left after {:.1} s",
                    self.set.dirty_blocks(),
                    limit.as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.drain = Some(self.drain_report(Drain::After, t0.elapsed(), before, &c0, &b0));
        Ok(())
    }

    /// FLUSH the cached bdev (so the set can be loaded by a later run), stop writeback, and
    /// build the report section. `read_blocks` is what the generator read, in cache blocks.
    pub fn finish(self, reactors: &ReactorSet, read_blocks: u64) -> Result<CacheReport, String> {
        let desc = BdevDesc::new(self.bdev.clone());
        let t0 = Instant::now();
        let flushed = reactors
            .block_on(0, move || async move {
                let r = match desc.channel() {
                    Ok(ch) => ch.flush().await.status,
                    Err(e) => Err(e),
                };
                desc.close_channel();
                r
            })
            .map_err(|_| "reactor 0 stopped before the final flush".to_string())?;
        let final_flush = t0.elapsed();
        self.set.stop_migration();
        flushed.map_err(|e| format!("final flush of the cached bdev failed: {e}"))?;
        let zero = (DevCounts::default(), DevCounts::default());
        let (c0, b0) = self.start.unwrap_or(zero);
        let (c1, b1) = self.end.unwrap_or_else(|| (self.cache_dev.counts(), self.backing_dev.counts()));
        let (cache_dev, backing_dev) = (c1.minus(&c0), b1.minus(&b0));
        let bs = self.set.block_size() as u64;
        let miss = (backing_dev.read_bytes / bs).min(read_blocks);
        let wb_blocks = (backing_dev.write_bytes + backing_dev.zero_bytes) / bs;
        let seg_blocks =
            cache_dev.write_bytes.saturating_sub(cache_dev.log_writes * self.set.geometry().header_bytes() as u64) / bs;
        let counters = CacheCounters {
            read_hit_blocks: read_blocks - miss,
            read_miss_blocks: miss,
            hit_pct: (read_blocks > 0).then(|| round3((read_blocks - miss) as f64 / read_blocks as f64 * 100.0)),
            segments_written: cache_dev.log_writes,
            blocks_per_segment_write: (cache_dev.log_writes > 0)
                .then(|| round3(seg_blocks as f64 / cache_dev.log_writes as f64)),
            writeback_blocks: wb_blocks,
            cache_dev_read_blocks: cache_dev.read_bytes / bs,
            cache_dev,
            backing_dev,
        };
        let engine = self.engine_end.unwrap_or_else(|| EngineCounters::of(&self.set)).minus(&self.engine_start);
        let mu = self.set.index().memory_usage();
        let total = mu.per_slot_bytes + mu.per_segment_bytes;
        let slots = mu.slots.max(1);
        let index_ram = IndexRam {
            slots: mu.slots,
            slot_arrays_bytes: mu.per_slot_bytes,
            segment_table_bytes: mu.per_segment_bytes,
            bytes_per_slot: round3(total as f64 / slots as f64),
            bytes_per_cached_4k: round3(total as f64 / slots as f64 * 4096.0 / bs as f64),
        };
        Ok(CacheReport {
            cache_file: self.spec.cache_path.display().to_string(),
            backing_file: self.spec.backing_path.display().to_string(),
            mode: cache::mode_name(self.spec.mode),
            opened_by: if self.spec.format { "format" } else { "load" },
            setup_s: round3(self.setup.as_secs_f64()),
            backing_delay_us: self.spec.backing_delay_us.map(|(a, p)| [a, p]),
            block_size: self.set.block_size(),
            segment_size: self.set.geometry().segment_size(),
            nr_segments: self.set.nr_segments(),
            counters,
            free_segments: self.set.free_segments(),
            dirty_blocks: self.set.dirty_blocks(),
            writeback_seq: self.set.superblock().writeback_seq,
            final_flush_ms: round3(final_flush.as_secs_f64() * 1000.0),
            index_ram,
            engine,
            engine_hit_pct: engine.hit_pct(),
            cached_blocks: self.cached_blocks,
            drain: self.drain.clone(),
            writeback_decision: self.decision.clone(),
            tail_guard: self.guard_json(),
            path_latency_us: self.path_latency.clone(),
        })
    }

    /// Close the files (after the reactors stopped).
    pub fn close_files(files: &[Arc<dyn Bdev>]) {
        for f in files {
            f.shutdown();
        }
    }

    /// The uring bdevs under the set, for [`CachedTarget::close_files`].
    pub fn files(&self) -> Vec<Arc<dyn Bdev>> {
        self.files.clone()
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cache: &str) -> CachedSpec {
        CachedSpec {
            cache_path: PathBuf::from(cache),
            backing_path: PathBuf::from("/dev/null"),
            backing_delay_us: None,
            format: true,
            segment_size: 512 << 10,
            mode: CacheMode::WriteBack,
            block_size: 4096,
            promote_after: None,
            seq_cutoff: None,
            writeback_low_pct: None,
            writeback_percent: None,
            dirty_cutoff_pct: None,
            prefill_ios: None,
            migration_core: None,
            drain: Drain::No,
        }
    }

    #[test]
    fn cache_malloc_size_is_parsed_and_bad_sizes_are_refused() {
        assert_eq!(spec("/data/cache.img").cache_malloc_bytes(), Ok(None));
        assert_eq!(spec("malloc:64M").cache_malloc_bytes(), Ok(Some(64 << 20)));
        for bad in ["malloc:0", "malloc:12345", "malloc:lots"] {
            let e = spec(bad).cache_malloc_bytes().expect_err(bad);
            assert!(e.contains("malloc:"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_migration_core_makes_the_reactor_after_the_job_reactors_the_migration_reactor() {
        let mut s = spec("malloc:64M");
        assert_eq!(s.options(2).migration_reactor, None);
        s.migration_core = Some(0);
        assert_eq!(s.options(2).migration_reactor, Some(2));
    }
}
