//! tiercache-perf: a bdevperf-like load generator that runs inside tiercache's reactors.
//!
//! Each reactor runs `-q` long-lived tasks; each task loops submit → await → record, reusing
//! the buffer that came back with the completion. Latency goes into a per-reactor
//! `hdrhistogram` (merged after the run). See `tiercache-perf --help` and
//! docs/benchmarks.md.
//!
//! The binary is a thin wrapper over [`run_cli`], so tests run the real command in-process.

pub mod cached;
pub mod config;
pub mod idle;
pub mod job;
pub mod pattern;
pub mod report;
pub mod rng;
pub mod size;
pub mod target;
pub mod trace;
pub mod zipf;

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tiercache_engine::reactor::{ReactorConfig, ReactorSet};

pub use config::{parse_args, CliError, JobConfig, Limit, Mode, RunOptions, TargetSpec, VerifyPass, Workload};
pub use job::run_job;
pub use report::Report;

/// Exit code of a run that completed but found I/O errors or verify mismatches, or could
/// not start.
pub const EXIT_FAILED: i32 = 1;
/// Exit code of a usage error.
pub const EXIT_USAGE: i32 = 2;

/// Start the reactors of a run: pinned, busy-polling unless told otherwise, with a ring
/// deep enough for the queue depth.
pub fn start_reactors(
    cores: &[Option<usize>],
    busy_poll: bool,
    idle_threshold: Option<std::time::Duration>,
    queue_depth: u32,
) -> Result<ReactorSet, String> {
    start_reactors_with(cores, busy_poll, Vec::new(), idle_threshold, queue_depth)
}

/// [`start_reactors`], where the reactors in `idle_sleepers` (background work only) sleep
/// when idle even under busy-poll.
pub fn start_reactors_with(
    cores: &[Option<usize>],
    busy_poll: bool,
    idle_sleepers: Vec<usize>,
    idle_threshold: Option<std::time::Duration>,
    queue_depth: u32,
) -> Result<ReactorSet, String> {
    let base = ReactorConfig::default();
    let cfg = ReactorConfig {
        cores: cores.to_vec(),
        busy_poll,
        idle_sleepers,
        idle_threshold: idle_threshold.unwrap_or(base.idle_threshold),
        ring_entries: base.ring_entries.max(queue_depth.next_power_of_two()),
        name: "perf-reactor".into(),
        ..base
    };
    ReactorSet::start(cfg).map_err(|e| format!("cannot start reactors on {cores:?}: {e}"))
}

/// Run a parsed job end to end: create the target, start reactors, run, build the report.
/// Progress lines (if enabled) go to `out`.
pub fn run(opts: &RunOptions, out: &mut dyn Write, stop: Arc<AtomicBool>) -> Result<Report, String> {
    if let TargetSpec::Cached(spec) = &opts.target {
        return run_cached(opts, spec, out, stop);
    }
    let (bdev, target) = target::create(&opts.target)?;
    let cores: Vec<Option<usize>> = opts.cores.iter().map(|&c| Some(c)).collect();
    let config = report::ConfigEcho::new(&opts.job, &cores, opts.busy_poll);
    // Fail on geometry before starting threads.
    job::check_geometry(&opts.job, bdev.as_ref(), cores.len())?;
    if !opts.json {
        let _ = write!(out, "{}", report::header(&config, &target, opts.seed_given));
        let _ = out.flush();
    }
    let set = start_reactors(&cores, opts.busy_poll, opts.idle_threshold, opts.job.queue_depth)?;
    let progress: Option<&mut dyn Write> = if opts.progress { Some(out) } else { None };
    let outcome = run_job(&set, bdev.clone(), &cores, &opts.job, progress, stop);
    set.stop();
    bdev.shutdown();
    let mut report = report::build(outcome?, config, target, opts.histogram);
    report.trace = trace_report(opts);
    Ok(report)
}

/// The `trace` section: the replayed trace's length and its LRU simulation.
fn trace_report(opts: &RunOptions) -> Option<report::TraceReport> {
    let t = opts.job.trace.as_ref()?;
    Some(report::TraceReport { entries: t.len() as u64, lru: opts.lru_sim.map(|cap| trace::simulate_lru(t, cap)) })
}

/// [`run`] for a `--cache` target: the reactors start first (the cache set is formatted or
/// loaded on them), the job runs on the cached bdev, then a FLUSH makes the run's writes
/// durable (so a later run can load the set) and the cache counters go into the report.
fn run_cached(
    opts: &RunOptions,
    spec: &cached::CachedSpec,
    out: &mut dyn Write,
    stop: Arc<AtomicBool>,
) -> Result<Report, String> {
    let cores: Vec<Option<usize>> = opts.cores.iter().map(|&c| Some(c)).collect();
    let config = report::ConfigEcho::new(&opts.job, &cores, opts.busy_poll);
    // The job runs on `cores`; a migration core adds one reactor after them.
    let mut all_cores = cores.clone();
    all_cores.extend(spec.migration_core.map(Some));
    // The migration reactor sleeps when idle: it shares its core with the threads that
    // drive it (the migration thread's requests arrive through its inbox).
    let sleepers = spec.migration_core.map(|_| vec![cores.len()]).unwrap_or_default();
    let set = start_reactors_with(&all_cores, opts.busy_poll, sleepers, opts.idle_threshold, opts.job.queue_depth)?;
    let mut tgt = match cached::CachedTarget::open(spec, &set, opts.job.seed) {
        Ok(t) => t,
        Err(e) => {
            set.stop();
            return Err(e);
        }
    };
    let files = tgt.files();
    let bdev: Arc<dyn tiercache_engine::bdev::Bdev> = tgt.bdev.clone();
    let target = target::echo(bdev.as_ref(), "cache", Some(spec.cache_path.display().to_string()));
    let result = (|| {
        job::check_geometry(&opts.job, bdev.as_ref(), cores.len())?;
        if !opts.json {
            let _ = write!(out, "{}", report::header(&config, &target, opts.seed_given));
            let _ = out.flush();
        }
        if let Some(n) = spec.prefill_ios {
            prefill(&set, &bdev, &cores, &opts.job, n, stop.clone())?;
        }
        let progress: Option<&mut dyn Write> = if opts.progress { Some(out) } else { None };
        tgt.job_started();
        let outcome = run_job(&set, bdev.clone(), &cores, &opts.job, progress, stop);
        tgt.job_ended();
        if spec.drain == cached::Drain::After {
            tgt.drain_after(std::time::Duration::from_secs(600))?;
        }
        outcome
    })();
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            tgt.set.stop_migration();
            drop(tgt);
            set.stop();
            cached::CachedTarget::close_files(&files);
            return Err(e);
        }
    };
    let read_blocks: u64 =
        outcome.reactors.iter().map(|r| r.counts.reads).sum::<u64>() * opts.job.io_size / bdev.info().block_size as u64;
    let mut report = report::build(outcome, config, target, opts.histogram);
    let cache = tgt.finish(&set, read_blocks);
    drop(bdev);
    set.stop();
    cached::CachedTarget::close_files(&files);
    report.cache = Some(cache?);
    report.trace = trace_report(opts);
    Ok(report)
}

/// The whole command: parse, run, print. Returns the process exit code (0 ok, 1 I/O
/// errors / verify mismatches / setup failure, 2 usage error).
/// Seed offset of the unmeasured prefill job (`--prefill-ios`): its own I/O sequence.
const PREFILL_SEED_OFFSET: u64 = 1000;

/// `--prefill-ios`: the job's workload for `ios` I/Os, unmeasured; any I/O error fails the
/// run (a prefill that did not happen would make the measured job a different one).
fn prefill(
    set: &ReactorSet,
    bdev: &Arc<dyn tiercache_engine::bdev::Bdev>,
    cores: &[Option<usize>],
    job: &JobConfig,
    ios: u64,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let pre = JobConfig { limit: Limit::Count(ios), seed: job.seed.wrapping_add(PREFILL_SEED_OFFSET), ..job.clone() };
    let outcome = run_job(set, bdev.clone(), cores, &pre, None, stop)?;
    let errors: u64 = outcome.reactors.iter().map(|r| r.counts.errors).sum();
    if errors > 0 {
        return Err(format!("prefill: {errors} I/O errors in {ios} I/Os"));
    }
    Ok(())
}

pub fn run_cli<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write, stop: Arc<AtomicBool>) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mode = match parse_args(args) {
        Ok(m) => m,
        Err(e) => {
            let w: &mut dyn Write = if e.is_info() { out } else { err };
            let _ = write!(w, "{e}");
            if !e.to_string().ends_with('\n') {
                let _ = writeln!(w);
            }
            return e.exit_code();
        }
    };
    match mode {
        Mode::GenTrace { path, spec } => {
            let header = format!(
                "tiercache-perf trace: zipf theta {} over {} blocks, {} draws, scan every {:?}, seed {}",
                spec.theta, spec.blocks, spec.zipf_accesses, spec.scan_every, spec.seed
            );
            match trace::generate(&spec).and_then(|t| trace::write(&path, &header, &t).map(|()| t.len())) {
                Ok(n) => {
                    let _ = writeln!(out, "{header}: {n} entries written to {}", path.display());
                    0
                }
                Err(e) => {
                    let _ = writeln!(err, "tiercache-perf: {e}");
                    EXIT_FAILED
                }
            }
        }
        Mode::IdleCheck { cores, secs, json } => match idle::idle_check(&cores, secs) {
            Ok(r) => {
                if json {
                    let _ = writeln!(out, "{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                } else {
                    let _ = writeln!(
                        out,
                        "idle-check: {} idle reactor(s) on cores {:?} for {:.2} s: utime {:.3} s + stime {:.3} s = {:.3}% of one core ({} loop iterations, {} sleeps)",
                        r.cores.len(),
                        r.cores,
                        r.wall_s,
                        r.utime_s,
                        r.stime_s,
                        r.cpu_pct_of_one_core,
                        r.reactor_iterations,
                        r.reactor_sleeps
                    );
                }
                0
            }
            Err(e) => {
                let _ = writeln!(err, "tiercache-perf: {e}");
                EXIT_FAILED
            }
        },
        Mode::Run(opts) => match run(&opts, out, stop) {
            Ok(report) => {
                if opts.json {
                    match serde_json::to_string_pretty(&report) {
                        Ok(s) => {
                            let _ = writeln!(out, "{s}");
                        }
                        Err(e) => {
                            let _ = writeln!(err, "tiercache-perf: cannot encode the report: {e}");
                            return EXIT_FAILED;
                        }
                    }
                } else {
                    let _ = write!(out, "{}", report::render_text(&report));
                }
                if let Some(v) = report.verify.as_ref().filter(|v| v.mismatches > 0) {
                    let _ = writeln!(err, "tiercache-perf: verify FAILED: {} mismatching block(s)", v.mismatches);
                }
                if report.total.errors > 0 {
                    let _ = writeln!(err, "tiercache-perf: {} I/O error(s)", report.total.errors);
                }
                if report.ok {
                    0
                } else {
                    EXIT_FAILED
                }
            }
            Err(e) => {
                let _ = writeln!(err, "tiercache-perf: {e}");
                EXIT_FAILED
            }
        },
    }
}
