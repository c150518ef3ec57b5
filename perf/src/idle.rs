//! `--idle-check SECS`: how much CPU an idle reactor set burns (target: < 2% of a core).
//!
//! Starts reactors pinned to the given cores with busy-poll off (as the daemon runs them),
//! lets them settle, then measures this process's utime + stime from `/proc/self/stat` over
//! SECS. The main thread only sleeps, so the figure is the reactors' own.

use std::time::{Duration, Instant};

use serde::Serialize;
use tiercache_engine::reactor::{ReactorConfig, ReactorSet};

#[derive(Clone, Debug, Serialize)]
pub struct IdleReport {
    pub cores: Vec<usize>,
    pub wall_s: f64,
    pub utime_s: f64,
    pub stime_s: f64,
    /// (utime + stime) / wall, in percent of one core.
    pub cpu_pct_of_one_core: f64,
    pub reactor_iterations: u64,
    pub reactor_sleeps: u64,
}

/// (utime, stime) of this process in clock ticks.
pub fn proc_self_cpu_ticks() -> Result<(u64, u64), String> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| format!("cannot read /proc/self/stat: {e}"))?;
    // Fields after the command name (which may contain spaces) start at field 3 ("state").
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("malformed /proc/self/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| -> Result<u64, String> {
        f.get(i).and_then(|v| v.parse().ok()).ok_or_else(|| "malformed /proc/self/stat".to_string())
    };
    Ok((get(11)?, get(12)?)) // fields 14 and 15 of proc(5)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a system constant; no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

pub fn idle_check(cores: &[usize], secs: f64) -> Result<IdleReport, String> {
    let cfg = ReactorConfig { busy_poll: false, name: "perf-idle".into(), ..ReactorConfig::pinned(cores) };
    let set = ReactorSet::start(cfg).map_err(|e| format!("cannot start reactors: {e}"))?;
    std::thread::sleep(Duration::from_millis(200)); // let them go idle
    let before = proc_self_cpu_ticks()?;
    let stats0 = set.stats();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let wall = t0.elapsed().as_secs_f64();
    let after = proc_self_cpu_ticks()?;
    let stats1 = set.stats();
    set.stop();
    let hz = clock_ticks_per_sec();
    let utime = (after.0 - before.0) as f64 / hz;
    let stime = (after.1 - before.1) as f64 / hz;
    let sum = |f: fn(&tiercache_engine::reactor::ReactorStats) -> u64| -> u64 {
        stats1.iter().zip(&stats0).map(|(a, b)| f(a) - f(b)).sum()
    };
    Ok(IdleReport {
        cores: cores.to_vec(),
        wall_s: wall,
        utime_s: utime,
        stime_s: stime,
        cpu_pct_of_one_core: (utime + stime) / wall * 100.0,
        reactor_iterations: sum(|s| s.iterations),
        reactor_sleeps: sum(|s| s.sleeps),
    })
}
