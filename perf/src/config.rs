//! Command line (clap) and the validated job description it turns into.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use serde::Serialize;

use crate::size::parse_size;
use tiercache_engine::cache::CacheMode;

/// What the queue slots do.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Sequential reads (each reactor walks its own disjoint region).
    Read,
    /// Sequential writes (disjoint regions per reactor).
    Write,
    /// Uniform (or --zipf) random reads over the whole device.
    Randread,
    /// Uniform (or --zipf) random writes over the whole device.
    Randwrite,
    /// Random reads and writes, -M percent reads.
    Randrw,
    /// Write self-describing blocks and read them back, checking header and crc32c.
    Verify,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
            Workload::Randrw => "randrw",
            Workload::Verify => "verify",
        }
    }

    pub fn is_random(self) -> bool {
        matches!(self, Workload::Randread | Workload::Randwrite | Workload::Randrw)
    }

    pub fn is_sequential(self) -> bool {
        matches!(self, Workload::Read | Workload::Write)
    }
}

/// Which half of a verify run to do.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyPass {
    /// Write each block, read it back at once and compare (bdevperf's verify).
    Both,
    /// Only write the pattern (for a later `--verify-pass read`, e.g. across a restart).
    Write,
    /// Only read and check blocks written by an earlier `--verify-pass write` with the
    /// same seed, io size and block size.
    Read,
}

impl VerifyPass {
    pub fn name(self) -> &'static str {
        match self {
            VerifyPass::Both => "both",
            VerifyPass::Write => "write",
            VerifyPass::Read => "read",
        }
    }
}

/// When a run stops.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Limit {
    Time(Duration),
    /// Total I/Os over all reactors (reads + writes; flushes not counted).
    Count(u64),
}

/// A validated job (everything that does not depend on the target's geometry).
#[derive(Clone, Debug)]
pub struct JobConfig {
    pub workload: Workload,
    /// Percent of reads for randrw.
    pub read_pct: u8,
    pub io_size: u64,
    /// Queue slots (long-lived tasks) per reactor.
    pub queue_depth: u32,
    pub limit: Limit,
    /// Flush after every N writes on each reactor.
    pub flush_every: Option<u64>,
    pub zipf_theta: Option<f64>,
    pub seed: u64,
    pub verify_pass: VerifyPass,
    /// Replay these I/O slots in order (`--trace`) instead of drawing random ones.
    pub trace: Option<std::sync::Arc<Vec<u64>>>,
}

impl JobConfig {
    /// A small job for tests and examples.
    pub fn new(workload: Workload, io_size: u64, queue_depth: u32, limit: Limit, seed: u64) -> JobConfig {
        JobConfig {
            workload,
            read_pct: 50,
            io_size,
            queue_depth,
            limit,
            flush_every: None,
            zipf_theta: None,
            seed,
            verify_pass: VerifyPass::Both,
            trace: None,
        }
    }
}

/// The device under test.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetSpec {
    Null {
        size: u64,
        block_size: u32,
    },
    Malloc {
        size: u64,
        block_size: u32,
    },
    Uring {
        path: PathBuf,
        block_size: Option<u32>,
    },
    /// A cache set on one file in front of another (see [`crate::cached`]).
    Cached(Box<crate::cached::CachedSpec>),
    /// The bdevs of an SPDK-style JSON config (`{"subsystems":[{"subsystem":"bdev",...}]}`),
    /// as `tiercache serve --config` takes it; the run goes to `bdev` (default: the last
    /// bdev the config creates).
    Config {
        path: PathBuf,
        bdev: Option<String>,
    },
}

/// A full run as asked on the command line.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub job: JobConfig,
    pub target: TargetSpec,
    pub cores: Vec<usize>,
    pub busy_poll: bool,
    /// With busy-poll off: how long a reactor spins without work before it sleeps in the
    /// kernel (None = the engine's default).
    pub idle_threshold: Option<Duration>,
    pub json: bool,
    pub histogram: bool,
    pub progress: bool,
    /// The seed was given (`--seed`) rather than drawn.
    pub seed_given: bool,
    /// Also run the trace through an LRU of this many blocks (`--lru-sim`).
    pub lru_sim: Option<u64>,
}

/// What the command line asks for.
#[derive(Clone, Debug)]
pub enum Mode {
    Run(Box<RunOptions>),
    /// Write a seeded trace to a file (`--gen-trace`) and exit.
    GenTrace {
        path: PathBuf,
        spec: crate::trace::TraceSpec,
    },
    /// Start idle reactors and measure the CPU they use.
    IdleCheck {
        cores: Vec<usize>,
        secs: f64,
        json: bool,
    },
}

#[derive(Parser, Debug)]
#[command(
    name = "tiercache-perf",
    version,
    about = "bdevperf-like load generator: queue slots run as tasks inside pinned tiercache reactors",
    after_help = "Examples:\n  tiercache-perf --null 1G -w randread -q 128 -t 10 --cores 1\n  tiercache-perf --uring /data/f -w randrw -M 70 -o 4k -q 32 --cores 0,1 --json\n  tiercache-perf --malloc 64M -w verify -q 8 --io-count 100000\n  tiercache-perf --idle-check 10 --cores 1"
)]
struct Cli {
    /// I/O pattern.
    #[arg(short = 'w', long, value_enum, default_value = "randread")]
    workload: Workload,
    /// Percent of reads for randrw (0-100).
    #[arg(short = 'M', long = "rwmixread", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_pct: u8,
    /// Bytes per I/O (4096, 4k, 128K, 1M); a multiple of the target's block size.
    #[arg(short = 'o', long = "io-size", default_value = "4k", value_parser = parse_size)]
    io_size: u64,
    /// Outstanding I/Os (queue slots) per core.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    queue_depth: u32,
    /// Cores to run reactors on, pinned ("0", "0,1", "0-3").
    #[arg(long, default_value = "0")]
    cores: String,
    /// Run time in seconds (default 10 when --io-count is not given).
    #[arg(short = 't', long = "time", value_parser = parse_seconds, conflicts_with = "io_count")]
    time: Option<f64>,
    /// Stop after N I/Os in total (split over the cores).
    #[arg(long = "io-count", value_parser = clap::value_parser!(u64).range(1..))]
    io_count: Option<u64>,
    /// Flush after every N writes on each core.
    #[arg(long = "flush-every", value_parser = clap::value_parser!(u64).range(1..))]
    flush_every: Option<u64>,
    /// Zipf-skewed random offsets with exponent THETA (> 0; e.g. 0.99, 1.2).
    #[arg(long, value_name = "THETA", value_parser = parse_theta)]
    zipf: Option<f64>,
    /// Seed of every random stream (offsets, read/write mix, data); drawn and printed if absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Reactors never sleep (default for perf runs).
    #[arg(long = "busy-poll", action = ArgAction::SetTrue, overrides_with = "no_busy_poll")]
    busy_poll: bool,
    /// Let idle reactors sleep in the kernel.
    #[arg(long = "no-busy-poll", action = ArgAction::SetTrue, overrides_with = "busy_poll")]
    no_busy_poll: bool,
    /// With --no-busy-poll: microseconds a reactor spins without work before sleeping in
    /// io_uring_enter (0 = sleep as soon as an iteration finds nothing; engine default 1000).
    #[arg(long = "idle-threshold-us", value_name = "US", requires = "no_busy_poll")]
    idle_threshold_us: Option<u64>,
    /// Target: a null bdev of SIZE bytes (completes at once, no data).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, group = "target")]
    null: Option<u64>,
    /// Target: a RAM bdev of SIZE bytes.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, group = "target")]
    malloc: Option<u64>,
    /// Target: a file or block device through io_uring.
    #[arg(long, value_name = "FILE", group = "target")]
    uring: Option<PathBuf>,
    /// Target: the bdevs of a JSON config (the daemon's format; malloc, null, uring, delay and
    /// error bdevs); the run goes to --bdev NAME, or the last bdev it creates.
    #[arg(long, value_name = "FILE", group = "target")]
    config: Option<PathBuf>,
    /// With --config: the bdev to run on.
    #[arg(long, value_name = "NAME", requires = "config")]
    bdev: Option<String>,
    /// Target: a cache set on CACHE_FILE (uring) in front of --backing; the run goes to the
    /// cached bdev. Loads the set unless --cache-format is given. `malloc:SIZE` puts the
    /// cache on a RAM device instead (give --cache-format: it starts empty).
    #[arg(long, value_name = "CACHE_FILE", group = "target", requires = "backing")]
    cache: Option<PathBuf>,
    /// With --cache: the backing (slow) device's file.
    #[arg(long, value_name = "BACKING_FILE", requires = "cache")]
    backing: Option<PathBuf>,
    /// With --cache: put the backing file behind a delay bdev injecting AVG (and P99, default
    /// AVG) microseconds on every I/O, e.g. 5000,20000 for an HDD.
    #[arg(long = "backing-delay-us", value_name = "AVG[,P99]", requires = "cache", value_parser = parse_delay)]
    backing_delay_us: Option<(u64, u64)>,
    /// With --cache: format the cache file as a new, empty cache set (destroys its contents).
    #[arg(long = "cache-format", requires = "cache")]
    cache_format: bool,
    /// With --cache --cache-format: log segment size (power of two, 128k-4M; default 512k).
    #[arg(long = "segment-size", value_name = "SIZE", value_parser = parse_size, requires = "cache")]
    segment_size: Option<u64>,
    /// With --cache: writeback, writethrough, writearound or passthrough.
    #[arg(long = "cache-mode", value_name = "MODE", value_parser = parse_cache_mode, requires = "cache")]
    cache_mode: Option<CacheMode>,
    /// Block size of the target: 512 or 4096 (default 4096 for null/malloc/cache; detected for uring).
    #[arg(long = "block-size", value_parser = parse_size)]
    block_size: Option<u64>,
    /// Print one JSON document at the end (and no progress lines).
    #[arg(long)]
    json: bool,
    /// Print the full latency distribution.
    #[arg(long)]
    histogram: bool,
    /// One line per second while running (default unless --json).
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "no_progress")]
    progress: bool,
    /// No progress lines.
    #[arg(long = "no-progress", action = ArgAction::SetTrue, overrides_with = "progress")]
    no_progress: bool,
    /// verify: write+read back (both), only write, or only read-and-check.
    #[arg(long = "verify-pass", value_enum, default_value = "both")]
    verify_pass: VerifyPass,
    /// Replay the I/O slots (offset / io size) listed in FILE, one per line, in order
    /// (randread / randwrite / randrw; every queue slot takes the next entry). The job
    /// stops after one pass unless -t or --io-count says otherwise.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// With --trace: also run the trace through a plain LRU cache of BLOCKS entries and
    /// report its hit ratio next to the engine's.
    #[arg(long = "lru-sim", value_name = "BLOCKS", requires = "trace")]
    lru_sim: Option<u64>,
    /// Write a seeded trace to FILE and exit: --zipf THETA over --trace-blocks blocks,
    /// --trace-accesses draws, a full scan after every --trace-scan-every draws.
    #[arg(long = "gen-trace", value_name = "FILE")]
    gen_trace: Option<PathBuf>,
    /// With --gen-trace: working set in blocks.
    #[arg(long = "trace-blocks", value_name = "N", requires = "gen_trace")]
    trace_blocks: Option<u64>,
    /// With --gen-trace: zipf draws (scans come on top).
    #[arg(long = "trace-accesses", value_name = "N", requires = "gen_trace")]
    trace_accesses: Option<u64>,
    /// With --gen-trace: a full sequential scan of the working set after every K draws.
    #[arg(long = "trace-scan-every", value_name = "K", requires = "gen_trace")]
    trace_scan_every: Option<u64>,
    /// With --cache: promote a read miss on its Nth miss in the window (0: never; engine
    /// default 2).
    #[arg(long = "promote-after", value_name = "N", requires = "cache")]
    promote_after: Option<u32>,
    /// With --cache: sequential cutoff in bytes (0: off; engine default 4M).
    #[arg(long = "seq-cutoff", value_name = "SIZE", value_parser = parse_size_or_zero, requires = "cache")]
    seq_cutoff: Option<u64>,
    /// With --cache: start writeback when fewer than PCT percent of segments are free
    /// (engine default 25).
    #[arg(long = "writeback-low-pct", value_name = "PCT", requires = "cache")]
    writeback_low_pct: Option<u32>,
    /// With --cache: the rate controller's target dirty percent (engine default 10; 100
    /// keeps writeback idle unless the log runs short of space).
    #[arg(long = "writeback-percent", value_name = "PCT", requires = "cache")]
    writeback_percent: Option<u32>,
    /// With --cache: dirty percent at which writes of uncached blocks go straight to the
    /// backing device (engine default 70; 100: only when the log has no room).
    #[arg(long = "dirty-cutoff-pct", value_name = "PCT", requires = "cache",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    dirty_cutoff_pct: Option<u32>,
    /// With --cache: run the same workload for N I/Os first, unmeasured (seed + 1000), to
    /// bring the cache to a state — e.g. full of dirty data — within the one process (a
    /// malloc: cache does not outlive it). The report covers the measured job only.
    #[arg(long = "prefill-ios", value_name = "N", requires = "cache",
          value_parser = clap::value_parser!(u64).range(1..))]
    prefill_ios: Option<u64>,
    /// With --cache: after the job, ask for a full writeback (`CacheSet::request_drain`)
    /// and time it until no dirty block is left (`drain` in the report).
    #[arg(long = "drain", requires = "cache", conflicts_with = "drain_during")]
    drain: bool,
    /// With --cache: ask for a full writeback when the job starts, so it runs under the
    /// job's I/O (`drain` in the report says how much was written back meanwhile).
    #[arg(long = "drain-during", requires = "cache")]
    drain_during: bool,
    /// With --cache: one more reactor, pinned to CORE, that runs the set's writeback and
    /// reclaim I/O and no job I/O (the engine default is the last job reactor).
    #[arg(long = "migration-core", value_name = "CORE", requires = "cache")]
    migration_core: Option<usize>,
    /// Start the reactors idle (no busy-poll), sleep SECS, report the CPU they used.
    #[arg(long = "idle-check", value_name = "SECS", value_parser = parse_seconds)]
    idle_check: Option<f64>,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("bad duration {s:?}: expected seconds, e.g. 10 or 0.5"))?;
    if !(v.is_finite() && v > 0.0 && v <= 30.0 * 86400.0) {
        return Err(format!("bad duration {s:?}: must be > 0 and at most 30 days"));
    }
    Ok(v)
}

fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        parse_size(s)
    }
}

fn parse_theta(s: &str) -> Result<f64, String> {
    let v: f64 =
        s.trim().parse().map_err(|_| format!("bad zipf theta {s:?}: expected a number such as 0.99 or 1.2"))?;
    if !(v.is_finite() && v > 0.0 && v <= 100.0) {
        return Err(format!("bad zipf theta {s:?}: must be in (0, 100]"));
    }
    Ok(v)
}

fn parse_delay(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("bad backing delay {s:?}: expected AVG or AVG,P99 in microseconds, e.g. 5000,20000");
    let mut it = s.split(',');
    let avg: u64 = it.next().ok_or_else(bad)?.trim().parse().map_err(|_| bad())?;
    let p99: u64 = match it.next() {
        Some(p) => p.trim().parse().map_err(|_| bad())?,
        None => avg,
    };
    if it.next().is_some() || p99 < avg || p99 > tiercache_bdevs::delay::MAX_LATENCY_US {
        return Err(format!("{}; P99 must be >= AVG and at most one hour", bad()));
    }
    Ok((avg, p99))
}

fn parse_cache_mode(s: &str) -> Result<CacheMode, String> {
    tiercache_engine::cache::parse_mode(s)
        .ok_or_else(|| format!("bad cache mode {s:?}: expected writeback, writethrough, writearound or passthrough"))
}

fn block_size_arg(bs: Option<u64>) -> Result<Option<u32>, String> {
    match bs {
        None => Ok(None),
        Some(b @ (512 | 4096)) => Ok(Some(b as u32)),
        Some(b) => Err(format!("bad --block-size {b}: must be 512 or 4096")),
    }
}

/// A command-line problem: clap's own (usage, --help, --version) or ours.
#[derive(Debug)]
pub enum CliError {
    Clap(clap::Error),
    Invalid(String),
}

impl CliError {
    /// Process exit code: 0 for --help/--version, 2 for usage errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Clap(e) => e.exit_code(),
            CliError::Invalid(_) => 2,
        }
    }

    /// Whether this is --help or --version output rather than an error.
    pub fn is_info(&self) -> bool {
        matches!(self, CliError::Clap(e) if e.exit_code() == 0)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Clap(e) => write!(f, "{}", e.render()),
            CliError::Invalid(m) => write!(f, "error: {m}\n\nFor more information, try '--help'."),
        }
    }
}

/// CPUs the kernel knows of (not just those in our affinity mask: `taskset -c 0
/// tiercache-perf --cores 1` is how the benchmarks keep the main thread off the reactor).
fn configured_cpus() -> usize {
    // SAFETY: sysconf only reads a system constant; it has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }
}

/// A seed from the clock and pid, for runs without `--seed` (always printed).
fn draw_seed() -> u64 {
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    crate::rng::mix(&[t, std::process::id() as u64]) >> 1 // fits an i64 for JSON consumers
}

/// Parse a command line (`args[0]` is the program name).
pub fn parse_args<I, T>(args: I) -> Result<Mode, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(CliError::Clap)?;
    let invalid = CliError::Invalid;
    let cores = tiercache_engine::reactor::ReactorConfig::parse_core_list(&cli.cores)
        .map_err(|e| invalid(format!("bad --cores {:?}: {e}", cli.cores)))?;
    let configured = configured_cpus();
    if let Some(c) = cores.iter().find(|&&c| c >= configured) {
        return Err(invalid(format!("bad --cores: core {c} does not exist (this machine has {configured} CPUs)")));
    }
    if let Some(secs) = cli.idle_check {
        return Ok(Mode::IdleCheck { cores, secs, json: cli.json });
    }
    if let Some(path) = cli.gen_trace {
        let spec = crate::trace::TraceSpec {
            blocks: cli.trace_blocks.ok_or_else(|| invalid("--gen-trace needs --trace-blocks N".into()))?,
            zipf_accesses: cli.trace_accesses.ok_or_else(|| invalid("--gen-trace needs --trace-accesses N".into()))?,
            theta: cli.zipf.ok_or_else(|| invalid("--gen-trace needs --zipf THETA".into()))?,
            scan_every: cli.trace_scan_every,
            seed: cli.seed.unwrap_or(0),
        };
        return Ok(Mode::GenTrace { path, spec });
    }
    let block_size = block_size_arg(cli.block_size).map_err(invalid)?;
    if cli.cache.is_none()
        && (cli.backing.is_some()
            || cli.backing_delay_us.is_some()
            || cli.cache_format
            || cli.segment_size.is_some()
            || cli.cache_mode.is_some()
            || cli.promote_after.is_some()
            || cli.seq_cutoff.is_some()
            || cli.writeback_low_pct.is_some()
            || cli.writeback_percent.is_some()
            || cli.dirty_cutoff_pct.is_some()
            || cli.prefill_ios.is_some()
            || cli.drain
            || cli.drain_during
            || cli.migration_core.is_some())
    {
        return Err(invalid(
            "--backing, --backing-delay-us, --cache-format, --segment-size, --cache-mode and the cache policy options apply only with --cache"
                .into(),
        ));
    }
    let target = if let Some(path) = cli.config {
        TargetSpec::Config { path, bdev: cli.bdev }
    } else {
        match (cli.null, cli.malloc, cli.uring, cli.cache) {
        (Some(size), None, None, None) => TargetSpec::Null { size, block_size: block_size.unwrap_or(4096) },
        (None, Some(size), None, None) => TargetSpec::Malloc { size, block_size: block_size.unwrap_or(4096) },
        (None, None, Some(path), None) => TargetSpec::Uring { path, block_size },
        (None, None, None, Some(cache_path)) => {
            let segment_size = match cli.segment_size {
                None => tiercache_engine::cache::ondisk::DEFAULT_SEGMENT_SIZE,
                Some(s) => {
                    let (lo, hi) = (
                        tiercache_engine::cache::ondisk::MIN_SEGMENT_SIZE,
                        tiercache_engine::cache::ondisk::MAX_SEGMENT_SIZE,
                    );
                    if !s.is_power_of_two() || s < lo as u64 || s > hi as u64 {
                        return Err(invalid(format!(
                            "bad --segment-size {s}: must be a power of two from {}k to {}M",
                            lo >> 10,
                            hi >> 20
                        )));
                    }
                    s as u32
                }
            };
            if cli.segment_size.is_some() && !cli.cache_format {
                return Err(invalid(
                    "--segment-size applies when formatting (--cache-format); a loaded set keeps its own".into(),
                ));
            }
            TargetSpec::Cached(Box::new(crate::cached::CachedSpec {
                cache_path,
                backing_path: cli.backing.ok_or_else(|| invalid("--cache needs --backing FILE".into()))?,
                backing_delay_us: cli.backing_delay_us,
                format: cli.cache_format,
                segment_size,
                mode: cli.cache_mode.unwrap_or(CacheMode::WriteBack),
                block_size: block_size.unwrap_or(4096),
                promote_after: cli.promote_after,
                seq_cutoff: cli.seq_cutoff,
                writeback_low_pct: cli.writeback_low_pct,
                writeback_percent: cli.writeback_percent,
                dirty_cutoff_pct: cli.dirty_cutoff_pct,
                prefill_ios: cli.prefill_ios,
                migration_core: cli.migration_core,
                drain: if cli.drain {
                    crate::cached::Drain::After
                } else if cli.drain_during {
                    crate::cached::Drain::During
                } else {
                    crate::cached::Drain::No
                },
            }))
        }
        _ => {
            return Err(invalid(
                "a target is required: --null SIZE, --malloc SIZE, --uring FILE, --cache FILE --backing FILE or --config FILE"
                    .into(),
            ))
        }
    }
    };
    if let TargetSpec::Null { size, block_size } | TargetSpec::Malloc { size, block_size } = &target {
        if size % *block_size as u64 != 0 {
            return Err(invalid(format!("target size {size} is not a multiple of the block size {block_size}")));
        }
    }
    if cli.io_size % 512 != 0 {
        return Err(invalid(format!(
            "bad --io-size {}: must be a multiple of 512 bytes (the block size)",
            cli.io_size
        )));
    }
    if cli.io_size > tiercache_engine::bdev::DEFAULT_MAX_IO_BYTES {
        return Err(invalid(format!(
            "bad --io-size {}: at most {} bytes per I/O",
            cli.io_size,
            tiercache_engine::bdev::DEFAULT_MAX_IO_BYTES
        )));
    }
    if cli.zipf.is_some() && !cli.workload.is_random() {
        return Err(invalid(format!(
            "--zipf applies to random workloads (randread, randwrite, randrw), not {}",
            cli.workload.name()
        )));
    }
    let trace = match &cli.trace {
        None => None,
        Some(p) => {
            if !cli.workload.is_random() {
                return Err(invalid(format!(
                    "--trace replays random workloads (randread, randwrite, randrw), not {}",
                    cli.workload.name()
                )));
            }
            if cli.zipf.is_some() {
                return Err(invalid("--trace and --zipf exclude each other (the trace says which blocks)".into()));
            }
            Some(std::sync::Arc::new(crate::trace::read(p).map_err(invalid)?))
        }
    };
    let limit = match (cli.time, cli.io_count, &trace) {
        (_, Some(n), _) => Limit::Count(n),
        (Some(t), None, _) => Limit::Time(Duration::from_secs_f64(t)),
        (None, None, Some(t)) => Limit::Count(t.len() as u64),
        (None, None, None) => Limit::Time(Duration::from_secs(10)),
    };
    let (seed, seed_given) = match cli.seed {
        Some(s) => (s, true),
        None => (draw_seed(), false),
    };
    let job = JobConfig {
        workload: cli.workload,
        read_pct: cli.read_pct,
        io_size: cli.io_size,
        queue_depth: cli.queue_depth,
        limit,
        flush_every: cli.flush_every,
        zipf_theta: cli.zipf,
        seed,
        verify_pass: cli.verify_pass,
        trace,
    };
    let progress = if cli.no_progress { false } else { cli.progress || !cli.json };
    Ok(Mode::Run(Box::new(RunOptions {
        job,
        target,
        cores,
        busy_poll: !cli.no_busy_poll,
        idle_threshold: cli.idle_threshold_us.map(Duration::from_micros),
        json: cli.json,
        histogram: cli.histogram,
        progress,
        seed_given,
        lru_sim: cli.lru_sim,
    })))
}
