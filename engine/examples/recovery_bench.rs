//! Recovery benchmark: how long `cache::load` takes on a full log, and how much index RAM a
//! cached block costs.
//!
//! 1. Format a cache set on a file (default 1 GiB) with a large sparse backing file, and
//!    fill the log with random 4 KiB writes (seeded offsets and data, QD 32) until it is
//!    nearly full. `writeback_free_low_percent` is 1 and the fill stops a few segments above
//!    that watermark, so writeback never runs: every segment stays above `writeback_seq`
//!    and must be replayed.
//! 2. FLUSH, stop the set and its reactors, close the files.
//! 3. Open the file again on fresh reactors and time `cache::load` (both superblocks, a
//!    read of every segment header, a read + crc32c of every replayed segment, replay into
//!    the index).
//! 4. For the breakdown, time the same reads as load issues them (one at a time) and at
//!    QD 16, and crc32c over the same bytes in memory.
//!
//! The file bdev here is a minimal `O_DIRECT` io_uring file (the engine's `FileIo`); the
//! uring bdev proper lives in the bdevs crate, which the engine cannot depend on.
//!
//! ```sh
//! cargo run --release -p tiercache-engine --example recovery_bench -- \
//!     --dir /work/tc-bench --cache-mib 1024 --segment-kib 512 --seed 1 --core 1 [--json]
//! ```

use std::any::Any;
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tiercache_engine::bdev::{Bdev, BdevChannel, BdevDesc, BdevInfo, IoCompletion, IoFuture, IoRequest, IoType};
use tiercache_engine::cache::index::SegmentId;
use tiercache_engine::cache::{self, CacheMode, CacheOptions, CachedBdev};
use tiercache_engine::reactor::{self, FileIo, FileOpKind, ReactorConfig, ReactorSet};
use tiercache_engine::{Errno, IoBuf};

const BS: u32 = 4096;
const FILL_QD: u64 = 32;

/// A regular file opened with `O_DIRECT`, I/O through the reactor's io_uring.
struct FileBdev {
    info: BdevInfo,
    fd: Arc<OwnedFd>,
}

impl FileBdev {
    fn open(name: &str, path: &Path) -> std::io::Result<Arc<FileBdev>> {
        let f: File = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path)?;
        let size = f.metadata()?.len();
        let info = BdevInfo::new(name, "recovery_bench file", BS, size / BS as u64);
        Ok(Arc::new(FileBdev { info, fd: Arc::new(OwnedFd::from(f)) }))
    }
}

struct FileChannel {
    raw: RawFd,
    /// Keeps `raw` open while the channel (and so any I/O in flight) exists.
    _fd: Arc<OwnedFd>,
}

impl Bdev for FileBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        Ok(Box::new(FileChannel { raw: self.fd.as_raw_fd(), _fd: self.fd.clone() }))
    }
    fn driver(&self) -> &'static str {
        "file"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BdevChannel for FileChannel {
    fn submit(&self, io: IoRequest) -> IoFuture {
        let kind = match io.io_type {
            IoType::Read => FileOpKind::Read,
            IoType::Write => FileOpKind::Write { fua: io.fua },
            IoType::Flush => FileOpKind::Flush,
            IoType::Unmap | IoType::WriteZeroes => {
                return IoFuture::ready(IoCompletion::err(Errno::ENOTSUP, io.buf));
            }
        };
        // SAFETY: `raw` belongs to the OwnedFd this channel holds, and the engine keeps the
        // channel alive while an I/O it submitted is in flight.
        IoFuture::file(unsafe { FileIo::new(self.raw, kind, io.offset, io.len, io.buf) })
    }
}

/// Keeps the engine's log lines (the "recovered N segments (M records ...)" line of load).
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if r.level() <= log::Level::Warn {
            eprintln!("[{}] {}", r.level(), r.args());
        }
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(r.args().to_string());
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

struct Args {
    dir: PathBuf,
    cache_mib: u64,
    segment_kib: u32,
    seed: u64,
    core: Option<usize>,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        dir: PathBuf::from("/work/tc-bench"),
        cache_mib: 1024,
        segment_kib: 512,
        seed: 1,
        core: None,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(val()?),
            "--cache-mib" => a.cache_mib = val()?.parse().map_err(|e| format!("--cache-mib: {e}"))?,
            "--segment-kib" => a.segment_kib = val()?.parse().map_err(|e| format!("--segment-kib: {e}"))?,
            "--seed" => a.seed = val()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--core" => a.core = Some(val()?.parse().map_err(|e| format!("--core: {e}"))?),
            "--json" => a.json = true,
            "-h" | "--help" => {
                println!(
                    "recovery_bench [--dir DIR] [--cache-mib 1024] [--segment-kib 512] [--seed 1] [--core N] [--json]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(a)
}

fn reactors(core: Option<usize>) -> Result<ReactorSet, String> {
    let cfg = ReactorConfig { cores: vec![core], name: "recovery".into(), ..ReactorConfig::default() };
    ReactorSet::start(cfg).map_err(|e| format!("cannot start a reactor: {e}"))
}

fn opts(segment_kib: u32) -> CacheOptions {
    // No writeback while filling: the rate controller stays idle up to 100% dirty.
    CacheOptions {
        segment_size: segment_kib << 10,
        writeback_free_low_percent: 1,
        writeback_percent: 100,
        ..CacheOptions::default()
    }
}

/// splitmix64, for per-task seeds.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Filled {
    writes: u64,
    secs: f64,
    nr_segments: u32,
    free_after: usize,
    dirty_after: u64,
    writeback_seq: u64,
}

/// Format, fill to just above the writeback watermark, FLUSH, stop.
fn fill(a: &Args, cache_path: &Path, backing_path: &Path) -> Result<Filled, String> {
    let rs = reactors(a.core)?;
    let cache_dev = FileBdev::open("rb-cache", cache_path).map_err(|e| format!("{}: {e}", cache_path.display()))?;
    let backing_dev =
        FileBdev::open("rb-backing", backing_path).map_err(|e| format!("{}: {e}", backing_path.display()))?;
    let (seg_kib, seed, rs2) = (a.segment_kib, a.seed, rs.clone());
    let out = rs
        .block_on(0, move || async move {
            let set =
                cache::format("rb", BdevDesc::new(cache_dev), rs2, opts(seg_kib)).await.map_err(|e| e.to_string())?;
            let backing = match set.attach(BdevDesc::new(backing_dev), CacheMode::WriteBack).await {
                Ok(b) => b,
                Err(e) => {
                    set.stop_migration();
                    return Err(e.to_string());
                }
            };
            let n = set.nr_segments() as u64;
            let watermark = (n / 100).max(3);
            let slots = set.geometry().slots_per_segment() as u64;
            // Leave room for the open segment and a margin above the watermark.
            let target = (n - watermark - 8) * slots;
            let cached = CachedBdev::new("rb-cached", set.clone(), backing.clone());
            let volume_blocks = cached.info().num_blocks;
            let desc = BdevDesc::new(cached);
            let started = Instant::now();
            let issued = Rc::new(Cell::new(0u64));
            let failed = Rc::new(Cell::new(None));
            let mut joins = Vec::new();
            for t in 0..FILL_QD {
                let (desc, issued, failed) = (desc.clone(), issued.clone(), failed.clone());
                joins.push(reactor::spawn(async move {
                    let Ok(ch) = desc.channel() else {
                        failed.set(Some(Errno::ENXIO));
                        return;
                    };
                    let mut rng = SmallRng::seed_from_u64(mix(seed, t));
                    let mut buf = IoBuf::new(BS as usize);
                    while issued.get() < target && failed.get().is_none() {
                        issued.set(issued.get() + 1);
                        rng.fill(&mut buf[..]);
                        let lba = rng.gen_range(0..volume_blocks);
                        let c = ch.write(lba * BS as u64, buf, false).await;
                        if let Err(e) = c.status {
                            failed.set(Some(e));
                        }
                        buf = c.buf.unwrap_or_else(|| IoBuf::new(BS as usize));
                    }
                }));
            }
            for j in joins {
                j.await;
            }
            let flushed = match desc.channel() {
                Ok(ch) => ch.flush().await.status,
                Err(e) => Err(e),
            };
            let secs = started.elapsed().as_secs_f64();
            desc.close_channel();
            let r = Filled {
                writes: issued.get(),
                secs,
                nr_segments: set.nr_segments(),
                free_after: set.free_segments(),
                dirty_after: set.dirty_blocks(),
                writeback_seq: set.superblock().writeback_seq,
            };
            set.stop_migration();
            if let Some(e) = failed.get() {
                return Err(format!("a fill write failed: {e}"));
            }
            flushed.map_err(|e| format!("FLUSH failed: {e}"))?;
            Ok(r)
        })
        .map_err(|_| "reactor stopped during the fill".to_string())?;
    rs.stop();
    out
}

struct Loaded {
    secs: f64,
    nr_segments: u32,
    segments_in_use: u32,
    dirty_blocks: u64,
    log_line: Option<String>,
    slots: u64,
    index_bytes: u64,
    header_bytes: usize,
    segment_size: u32,
}

/// Time `cache::load` on fresh reactors.
fn load(a: &Args, cache_path: &Path) -> Result<Loaded, String> {
    CAPTURE.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let rs = reactors(a.core)?;
    let cache_dev = FileBdev::open("rb-cache", cache_path).map_err(|e| format!("{}: {e}", cache_path.display()))?;
    let (seg_kib, rs2) = (a.segment_kib, rs.clone());
    let t0 = Instant::now();
    let out = rs
        .block_on(0, move || async move {
            let set =
                cache::load("rb", BdevDesc::new(cache_dev), rs2, opts(seg_kib)).await.map_err(|e| e.to_string())?;
            let secs = t0.elapsed().as_secs_f64();
            let mu = set.index().memory_usage();
            let r = Loaded {
                secs,
                nr_segments: set.nr_segments(),
                segments_in_use: set.nr_segments() - set.free_segments() as u32,
                dirty_blocks: set.dirty_blocks(),
                log_line: None,
                slots: mu.slots,
                index_bytes: mu.per_slot_bytes + mu.per_segment_bytes,
                header_bytes: set.geometry().header_bytes(),
                segment_size: set.geometry().segment_size(),
            };
            set.stop_migration();
            Ok::<_, String>(r)
        })
        .map_err(|_| "reactor stopped during load".to_string())?;
    rs.stop();
    let mut l = out?;
    l.log_line = CAPTURE.0.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|s| s.contains("recovered")).cloned();
    Ok(l)
}

/// Read `(offset, len)` pieces of the cache file with at most `qd` in flight.
fn timed_reads(core: Option<usize>, path: &Path, pieces: Vec<(u64, usize)>, qd: usize) -> Result<f64, String> {
    let rs = reactors(core)?;
    let dev = FileBdev::open("rb-read", path).map_err(|e| format!("{}: {e}", path.display()))?;
    let out = rs
        .block_on(0, move || async move {
            let desc = BdevDesc::new(dev);
            let pieces = Rc::new(pieces);
            let next = Rc::new(Cell::new(0usize));
            let failed = Rc::new(Cell::new(None));
            let t0 = Instant::now();
            let mut joins = Vec::new();
            for _ in 0..qd {
                let (desc, pieces, next, failed) = (desc.clone(), pieces.clone(), next.clone(), failed.clone());
                joins.push(reactor::spawn(async move {
                    let Ok(ch) = desc.channel() else { return };
                    loop {
                        let i = next.get();
                        if i >= pieces.len() {
                            break;
                        }
                        next.set(i + 1);
                        let (off, len) = pieces[i];
                        if let Err(e) = ch.read(off, IoBuf::new(len)).await.status {
                            failed.set(Some(e));
                        }
                    }
                }));
            }
            for j in joins {
                j.await;
            }
            let secs = t0.elapsed().as_secs_f64();
            desc.close_channel();
            match failed.get() {
                Some(e) => Err(format!("read failed: {e}")),
                None => Ok(secs),
            }
        })
        .map_err(|_| "reactor stopped".to_string())?;
    rs.stop();
    out
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("recovery_bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&a) {
        eprintln!("recovery_bench: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> Result<(), String> {
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Info);
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let cache_path = a.dir.join("recovery-cache.dat");
    let backing_path = a.dir.join("recovery-backing.dat");
    let cache_bytes = a.cache_mib << 20;
    {
        let f = File::create(&cache_path).map_err(|e| format!("{}: {e}", cache_path.display()))?;
        f.set_len(cache_bytes).map_err(|e| e.to_string())?;
        // Sparse: the fill touches only its header and the blocks it writes back (none).
        let b = File::create(&backing_path).map_err(|e| format!("{}: {e}", backing_path.display()))?;
        b.set_len(64 << 30).map_err(|e| e.to_string())?;
    }
    let f = fill(a, &cache_path, &backing_path)?;
    if f.writeback_seq != 0 {
        return Err(format!("writeback ran during the fill (writeback_seq {}): lower the fill", f.writeback_seq));
    }
    let l = load(a, &cache_path)?;

    // Breakdown: the reads load issues, one at a time and at QD 16; crc32c of the data.
    let ss = l.segment_size as u64;
    let data_offset = {
        let rs = reactors(a.core)?;
        let dev = FileBdev::open("rb-geom", &cache_path).map_err(|e| e.to_string())?;
        let rs2 = rs.clone();
        let seg_kib = a.segment_kib;
        let off = rs
            .block_on(0, move || async move {
                let set =
                    cache::load("rb-geom", BdevDesc::new(dev), rs2, opts(seg_kib)).await.map_err(|e| e.to_string())?;
                let o = set.geometry().segment_offset(SegmentId(0));
                set.stop_migration();
                Ok::<_, String>(o)
            })
            .map_err(|_| "reactor stopped".to_string())?;
        rs.stop();
        off?
    };
    let headers: Vec<(u64, usize)> =
        (0..l.nr_segments as u64).map(|k| (data_offset + k * ss, l.header_bytes)).collect();
    let wholes: Vec<(u64, usize)> =
        (0..l.segments_in_use as u64).map(|k| (data_offset + k * ss, ss as usize)).collect();
    let hdr_qd1 = timed_reads(a.core, &cache_path, headers.clone(), 1)?;
    let hdr_qd16 = timed_reads(a.core, &cache_path, headers, 16)?;
    let seg_qd1 = timed_reads(a.core, &cache_path, wholes.clone(), 1)?;
    let seg_qd16 = timed_reads(a.core, &cache_path, wholes, 16)?;
    let crc_bytes = l.segments_in_use as u64 * ss;
    let crc_secs = {
        let mut rng = SmallRng::seed_from_u64(a.seed);
        let mut block = vec![0u8; ss as usize];
        rng.fill(&mut block[..]);
        let t0 = Instant::now();
        let mut acc = 0u32;
        // Per block, like the segment verification.
        for _ in 0..l.segments_in_use {
            for b in block.chunks_exact(BS as usize) {
                acc ^= crc32c::crc32c(b);
            }
        }
        std::hint::black_box(acc);
        t0.elapsed().as_secs_f64()
    };

    let (replayed, records) = l
        .log_line
        .as_deref()
        .and_then(|s| {
            let after = s.split("recovered ").nth(1)?;
            let segs: u64 = after.split_whitespace().next()?.parse().ok()?;
            let recs: u64 = after.split('(').nth(1)?.split_whitespace().next()?.parse().ok()?;
            Some((Some(segs), Some(recs)))
        })
        .unwrap_or((None, None));
    let per_slot = l.index_bytes as f64 / l.slots.max(1) as f64;
    let per_4k = per_slot * 4096.0 / BS as f64;
    let doc = serde_json::json!({
        "cache_file": cache_path.display().to_string(),
        "cache_bytes": cache_bytes,
        "segment_size": l.segment_size,
        "nr_segments": l.nr_segments,
        "fill": {
            "writes": f.writes,
            "secs": f.secs,
            "iops": f.writes as f64 / f.secs.max(1e-9),
            "free_segments_after": f.free_after,
            "dirty_blocks_after": f.dirty_after,
            "log_fill_pct": (f.nr_segments as f64 - f.free_after as f64) / f.nr_segments as f64 * 100.0,
        },
        "load": {
            "secs": l.secs,
            "segments_replayed": replayed,
            "records_replayed": records,
            "segments_in_use": l.segments_in_use,
            "dirty_blocks": l.dirty_blocks,
            "engine_log_line": l.log_line,
        },
        "breakdown": {
            "header_reads_qd1_secs": hdr_qd1,
            "header_reads_qd16_secs": hdr_qd16,
            "segment_reads_qd1_secs": seg_qd1,
            "segment_reads_qd16_secs": seg_qd16,
            "crc32c_per_4k_block_secs": crc_secs,
            "bytes_verified": crc_bytes,
        },
        "index_ram": {
            "slots": l.slots,
            "bytes": l.index_bytes,
            "bytes_per_slot": per_slot,
            "bytes_per_cached_4k_block": per_4k,
        },
    });
    if a.json {
        println!("{doc}");
    } else {
        println!(
            "fill: {} random 4 KiB writes in {:.2} s ({:.0} IOPS), log {:.1}% full ({} of {} segments free), {} dirty blocks",
            f.writes,
            f.secs,
            f.writes as f64 / f.secs.max(1e-9),
            (f.nr_segments as f64 - f.free_after as f64) / f.nr_segments as f64 * 100.0,
            f.free_after,
            f.nr_segments,
            f.dirty_after
        );
        println!(
            "load: {:.3} s for {} segments, {} records ({})",
            l.secs,
            replayed.map_or("?".into(), |v| v.to_string()),
            records.map_or("?".into(), |v| v.to_string()),
            l.log_line.as_deref().unwrap_or("no engine log line")
        );
        println!(
            "breakdown: {} header reads {:.3} s at QD1 ({:.3} s at QD16); {} segment reads {:.3} s at QD1 ({:.3} s at QD16); crc32c of {} MiB {:.3} s",
            l.nr_segments,
            hdr_qd1,
            hdr_qd16,
            l.segments_in_use,
            seg_qd1,
            seg_qd16,
            crc_bytes >> 20,
            crc_secs
        );
        println!(
            "index RAM: {} bytes for {} slots = {:.2} B per slot, {:.2} B per cached 4 KiB block",
            l.index_bytes, l.slots, per_slot, per_4k
        );
    }
    Ok(())
}
