//! A minimal NBD server for benchmarks: one export over a malloc bdev, or
//! over a write-back cached bdev (cache and backing on malloc bdevs).
//!
//! ```text
//! cargo run --release -p tiercache-nbd --example nbd_bench_server -- \
//!     --listen 127.0.0.1:10809 --cores 0 --size-mib 1024 [--cached] [--busy-poll]
//! ```
//! Prints `READY <address>` once it listens; exits when stdin closes or on SIGTERM.

use std::io::Read;

use clap::Parser;
use tiercache_bdevs::malloc::MallocBdev;
use tiercache_engine::bdev::BdevDesc;
use tiercache_engine::cache::{self, CacheMode, CacheOptions, CachedBdev};
use tiercache_engine::dma::IoBuf;
use tiercache_engine::reactor::{ReactorConfig, ReactorSet};
use tiercache_nbd::{ListenAddr, NbdServer};

/// Bytes per write when the cache bdev is written before formatting.
const PREFAULT_CHUNK: usize = 1 << 20;

#[derive(Parser)]
struct Args {
    /// Listen address (host:port, [v6]:port, unix:/path).
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Cores for the reactors ("0", "0-1", "0,2").
    #[arg(long, default_value = "0")]
    cores: String,
    /// Export size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Block size of the bdevs.
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// Export a write-back cached bdev (cache = size, backing = 2 × size, both malloc).
    /// The cache bdev is written once over its whole size before it is formatted, as the
    /// memory of a real cache device is there before the cache uses it: otherwise the
    /// first touch of each new 1 MiB malloc stripe (page faults, the kernel zeroing the
    /// pages) was 40% of the server's CPU at 4K randread, a cost of RAM bdevs, not of the
    /// cache engine.
    #[arg(long)]
    cached: bool,
    /// With --cached: leave the cache bdev untouched before formatting (first-touch costs
    /// included).
    #[arg(long)]
    cold_cache: bool,
    /// Reactors never sleep.
    #[arg(long)]
    busy_poll: bool,
    /// Idle time after which a reactor sleeps in the kernel (microseconds).
    #[arg(long, default_value_t = 1000)]
    idle_threshold_us: u64,
    /// Reactor rings with IORING_SETUP_DEFER_TASKRUN (for comparisons).
    #[arg(long)]
    defer_taskrun: bool,
    /// Hand SQEs to the kernel once this many are queued (0: once per reactor loop
    /// iteration, or with the sleep); ReactorConfig::submit_batch.
    #[arg(long, default_value_t = 1)]
    submit_batch: u32,
    /// Export name.
    #[arg(long, default_value = "bench")]
    name: String,
}

fn main() -> Result<(), String> {
    let _ = env_logger::builder().try_init();
    let a = Args::parse();
    let cores = ReactorConfig::parse_core_list(&a.cores)?;
    let cfg = ReactorConfig {
        busy_poll: a.busy_poll,
        idle_threshold: std::time::Duration::from_micros(a.idle_threshold_us),
        defer_taskrun: a.defer_taskrun,
        submit_batch: a.submit_batch,
        ..ReactorConfig::pinned(&cores)
    };
    let reactors = ReactorSet::start(cfg).map_err(|e| format!("reactors: {e}"))?;
    let blocks = (a.size_mib << 20) / u64::from(a.block_size);
    let mut cached = None;
    let desc = if a.cached {
        let c = MallocBdev::create("bench_cache", blocks, a.block_size).map_err(|e| e.to_string())?;
        let b = MallocBdev::create("bench_backing", 2 * blocks, a.block_size).map_err(|e| e.to_string())?;
        let rs = reactors.clone();
        let (bs, cold) = (a.block_size, a.cold_cache);
        let cb = reactors
            .block_on(0, move || async move {
                if !cold {
                    let cache_dev = BdevDesc::new(c.clone());
                    let ch = cache_dev.channel().map_err(|e| format!("cache channel: {e}"))?;
                    let size = ch.info().size_bytes();
                    for off in (0..size).step_by(PREFAULT_CHUNK) {
                        let len = (size - off).min(PREFAULT_CHUNK as u64) as usize;
                        ch.write(off, IoBuf::new(len), false).await.status.map_err(|e| format!("prefault: {e}"))?;
                    }
                }
                let opts = CacheOptions { block_size: bs, ..CacheOptions::default() };
                let set = cache::format("bench_cs", BdevDesc::new(c), rs, opts).await.map_err(|e| e.to_string())?;
                let back = set.attach(BdevDesc::new(b), CacheMode::WriteBack).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(CachedBdev::new("bench_cached", set, back))
            })
            .map_err(|e| e.to_string())??;
        cached = Some(cb.clone());
        BdevDesc::new(cb)
    } else {
        BdevDesc::new(MallocBdev::create("bench_malloc", blocks, a.block_size).map_err(|e| e.to_string())?)
    };
    let server = NbdServer::new(reactors.clone());
    server.add_export(&a.name, desc, false, None).map_err(|e| format!("add_export: {e}"))?;
    let addr = server.listen(&ListenAddr::parse(&a.listen)?).map_err(|e| format!("listen: {e}"))?;
    println!("READY {addr}");
    let mut sink = [0u8; 64];
    while std::io::stdin().read(&mut sink).is_ok_and(|n| n > 0) {}
    server.stop();
    if let Some(cb) = cached {
        cb.cache_set().stop_migration();
    }
    reactors.stop();
    Ok(())
}
