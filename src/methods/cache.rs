//! Cache methods (modelled on SPDK's `bdev_ocf_*`): create / load / delete cached bdevs,
//! stats, cache mode, flush (drain of dirty data) with progress. Detach / attach,
//! sequential cut-off and the error-policy options are not in the engine yet: they answer
//! `-EOPNOTSUPP`.

use std::sync::Arc;

use serde_json::{json, Value};
use tiercache_engine::bdev::IoStats;
use tiercache_engine::cache::index::SegmentId;
use tiercache_engine::cache::ondisk::{BackingHeaderOnDisk, FormatError};
use tiercache_engine::cache::{self, mode_name, CacheError, CacheMode, CacheOptions, CacheSet, CachedBdev};
use tiercache_engine::IoBuf;
use tiercache_jsonrpc::schema::{
    self as s, BdevCacheAttachParams, BdevCacheCreateParams, BdevCacheGetBdevsParams, BdevCacheLoadParams,
    BdevCacheSetCacheModeParams, BdevCacheSetOptionsParams, BdevCacheSetSeqcutoffParams, NameParams,
};
use tiercache_jsonrpc::RpcError;

use super::bdev::{claim, iostat_json};
use super::{not_supported, reg};
use crate::target::{lock, CacheSetEntry, FlushProgress, Target};

pub fn register(t: &Arc<Target>) -> Result<(), RpcError> {
    reg(t, "bdev_cache_create", |t, p: BdevCacheCreateParams| async move {
        let _g = t.ops.lock().await;
        let args = CreateArgs {
            name: p.name,
            mode: Some(engine_mode(p.mode)),
            cache: p.cache_bdev_name,
            core: p.core_bdev_name,
            segment_size_kib: p.segment_size_kib,
            format: p.format,
            block_size: p.block_size,
        };
        create(&t, args).await
    })?;
    reg(t, "bdev_cache_load", |t, p: BdevCacheLoadParams| async move {
        let _g = t.ops.lock().await;
        load(&t, p).await
    })?;
    reg(t, "bdev_cache_delete", |t, p: NameParams| async move {
        let _g = t.ops.lock().await;
        delete(&t, &p.name).await
    })?;
    reg(t, "bdev_cache_get_bdevs", |t, p: BdevCacheGetBdevsParams| async move { get_bdevs(&t, p) })?;
    reg(t, "bdev_cache_get_stats", |t, p: NameParams| async move { get_stats(&t, &p.name).await })?;
    reg(t, "bdev_cache_reset_stats", |t, p: NameParams| async move {
        let (desc, _) = t.cached_bdev(&p.name)?;
        let now = desc.iostat(&t.reactors).await;
        lock(&t.stats_base).insert(p.name, now);
        Ok(true)
    })?;
    reg(t, "bdev_cache_set_cache_mode", |t, p: BdevCacheSetCacheModeParams| async move {
        let (desc, _) = t.cached_bdev(&p.name)?;
        if let Some(cb) = desc.bdev().as_any().downcast_ref::<CachedBdev>() {
            let old = cb.mode();
            cb.set_mode(engine_mode(p.mode));
            log::info!("{}: cache mode {} -> {}", p.name, mode_name(old), p.mode);
        }
        Ok(true)
    })?;
    reg(t, "bdev_cache_set_seqcutoff", |t, p: BdevCacheSetSeqcutoffParams| async move {
        t.cached_bdev(&p.name)?;
        Err::<bool, _>(not_supported("bdev_cache_set_seqcutoff (sequential cut-off)"))
    })?;
    reg(t, "bdev_cache_set_options", |t, p: BdevCacheSetOptionsParams| async move { set_options(&t, p) })?;
    reg(t, "bdev_cache_flush_start", |t, p: NameParams| async move {
        let (_, set) = t.cached_bdev(&p.name)?;
        if set.is_failed() {
            return Err(RpcError::from_errno(libc::EIO, format!("the cache device of {} has failed", p.name)));
        }
        let dirty = set.dirty_blocks();
        if let Some(key) = t.cache_key_of(&set) {
            if let Some(e) = lock(&t.caches).get_mut(&key) {
                e.flush = Some(FlushProgress { started: std::time::Instant::now(), dirty_at_start: dirty });
            }
        }
        set.request_drain();
        log::info!("{}: flush of the cache set requested ({dirty} dirty blocks)", p.name);
        Ok(true)
    })?;
    reg(t, "bdev_cache_flush_status", |t, p: NameParams| async move { flush_status(&t, &p.name) })?;
    reg(t, "bdev_cache_detach", |t, p: NameParams| async move {
        t.cached_bdev(&p.name)?;
        Err::<bool, _>(not_supported("bdev_cache_detach (detaching the cache from a cached bdev)"))
    })?;
    reg(t, "bdev_cache_attach", |t, p: BdevCacheAttachParams| async move {
        t.cached_bdev(&p.name)?;
        Err::<bool, _>(not_supported("bdev_cache_attach (attaching a cache to a running cached bdev)"))
    })?;
    Ok(())
}

/// The engine's cache mode for an RPC mode.
pub fn engine_mode(m: s::CacheMode) -> CacheMode {
    match m {
        s::CacheMode::Writeback => CacheMode::WriteBack,
        s::CacheMode::Writethrough => CacheMode::WriteThrough,
        s::CacheMode::Writearound => CacheMode::WriteAround,
        s::CacheMode::Passthrough => CacheMode::None,
    }
}

struct CreateArgs {
    name: String,
    /// `None`: the mode recorded for this backing device in the superblock.
    mode: Option<CacheMode>,
    cache: String,
    core: String,
    segment_size_kib: Option<u32>,
    format: bool,
    block_size: Option<u32>,
}

/// True when `e` says the device carries no tiercache superblock at all.
fn is_unformatted(e: &CacheError) -> bool {
    match e {
        CacheError::Format(FormatError::NotACacheDevice) => true,
        CacheError::Format(FormatError::BothSuperblocksCorrupt { a, b }) => {
            matches!(**a, FormatError::NotACacheDevice) && matches!(**b, FormatError::NotACacheDevice)
        }
        _ => false,
    }
}

fn cache_err(e: &CacheError, what: &str) -> RpcError {
    RpcError::from_errno(e.errno().0, format!("{what}: {e}"))
}

/// Creates cached bdev `a.name` (the caller holds `t.ops`).
async fn create(t: &Arc<Target>, a: CreateArgs) -> Result<String, RpcError> {
    if t.bdevs.get(&a.name).is_some() {
        return Err(RpcError::exists(format!("bdev {} already exists", a.name)));
    }
    let cache_desc = t.open(&a.cache)?;
    let core_info = t.open(&a.core)?.bdev().info().clone();
    if let Some(by) = t.bdevs.claimed_by(&a.core) {
        return Err(RpcError::busy(format!("bdev {} is already claimed by {by}", a.core)));
    }
    let existing = lock(&t.caches).get(&a.cache).map(|e| e.set.clone());
    let (set, new_entry) = match existing {
        Some(set) => {
            let retired = lock(&t.caches).get(&a.cache).is_some_and(|e| e.retired_cores.contains(&a.core));
            if retired {
                return Err(not_supported(format!(
                    "re-attaching {} to the running cache set on {} it was removed from (it stays registered in the \
                     set until the set is closed)",
                    a.core, a.cache
                )));
            }
            if a.format {
                return Err(RpcError::busy(format!(
                    "bdev {} already holds a running cache set; \"format\": true would destroy it",
                    a.cache
                )));
            }
            (set, None)
        }
        None => {
            claim(t, &a.cache, &a.name)?;
            let bs = a.block_size.unwrap_or_else(|| core_info.block_size.max(cache_desc.bdev().info().block_size));
            let opts = CacheOptions {
                segment_size: a
                    .segment_size_kib
                    .map_or(CacheOptions::default().segment_size, |k| k.saturating_mul(1024)),
                block_size: bs,
                ..CacheOptions::default()
            };
            let (set_name, format, desc) = (a.cache.clone(), a.format, cache_desc.clone());
            let reactors = t.reactors.clone();
            let r = t
                .on_reactor(move || async move {
                    if format {
                        cache::format(&set_name, desc, reactors, opts).await
                    } else {
                        cache::load(&set_name, desc, reactors, opts).await
                    }
                })
                .await;
            let set = match r {
                Ok(Ok(set)) => set,
                Ok(Err(e)) => {
                    t.bdevs.release(&a.cache, &a.name);
                    if !a.format && is_unformatted(&e) {
                        return Err(RpcError::from_errno(
                            e.errno().0,
                            format!(
                                "bdev {} is not formatted as a tiercache cache device; pass \"format\": true to \
                                 format it (this erases it)",
                                a.cache
                            ),
                        ));
                    }
                    let what = if a.format { "cannot format" } else { "cannot load the cache set on" };
                    return Err(cache_err(&e, &format!("{what} bdev {}", a.cache)));
                }
                Err(e) => {
                    t.bdevs.release(&a.cache, &a.name);
                    return Err(e);
                }
            };
            if let Some(bs) = a.block_size.filter(|bs| *bs != set.block_size()) {
                set.stop_migration();
                t.bdevs.release(&a.cache, &a.name);
                return Err(RpcError::invalid_argument(format!(
                    "block_size {bs} differs from the cache set's block size {} on {}",
                    set.block_size(),
                    a.cache
                )));
            }
            let origin = if a.format { "formatted" } else { "loaded" };
            let seg_kib = set.geometry().segment_size() / 1024;
            let entry = CacheSetEntry {
                set: set.clone(),
                claimer: a.name.clone(),
                members: Vec::new(),
                retired_cores: Vec::new(),
                origin,
                segment_size_kib: seg_kib,
                flush: None,
            };
            (set, Some(entry))
        }
    };
    // From here on, failures undo what this call did.
    let undo_set = |t: &Target| {
        if new_entry.is_some() {
            set.stop_migration();
            t.bdevs.release(&a.cache, &a.name);
        }
    };
    let core_desc = match claim(t, &a.core, &a.name) {
        Ok(d) => d,
        Err(e) => {
            undo_set(t);
            return Err(e);
        }
    };
    let mode = match a.mode {
        Some(m) => m,
        None => recorded_mode(t, &set, core_desc.clone()).await.unwrap_or(CacheMode::WriteBack),
    };
    let (s2, d2) = (set.clone(), core_desc.clone());
    let r = t.on_reactor(move || async move { s2.attach(d2, mode).await }).await;
    let backing = match r {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            t.bdevs.release(&a.core, &a.name);
            undo_set(t);
            return Err(cache_err(&e, &format!("cannot attach bdev {} to the cache set on {}", a.core, a.cache)));
        }
        Err(e) => {
            t.bdevs.release(&a.core, &a.name);
            undo_set(t);
            return Err(e);
        }
    };
    let bdev = CachedBdev::new(&a.name, set.clone(), backing);
    if let Err(e) = t.bdevs.register(bdev) {
        t.bdevs.release(&a.core, &a.name);
        undo_set(t);
        return Err(crate::target::errno_err(e, format!("cannot register bdev {}", a.name)));
    }
    {
        let mut caches = lock(&t.caches);
        if let Some(e) = new_entry {
            caches.insert(a.cache.clone(), e);
        }
        if let Some(e) = caches.get_mut(&a.cache) {
            e.members.push(a.name.clone());
        }
    }
    log::info!(
        "cached bdev {} created: {} over {} (cache {}, {} blocks of {} bytes)",
        a.name,
        mode_name(mode),
        a.core,
        a.cache,
        set.nr_segments(),
        set.block_size()
    );
    Ok(a.name)
}

/// Reads `core`'s backing header and returns the mode the superblock records for it.
async fn recorded_mode(t: &Target, set: &Arc<CacheSet>, core: tiercache_engine::bdev::BdevDesc) -> Option<CacheMode> {
    let uuid = backing_header(t, core).await?.backing();
    let sb = set.superblock();
    sb.find_backing(uuid).map(|e| e.cache_mode)
}

/// The tiercache backing header of `desc`, if it has one.
async fn backing_header(t: &Target, desc: tiercache_engine::bdev::BdevDesc) -> Option<BackingHeaderOnDisk> {
    let len = 4096usize.max(desc.bdev().info().block_size as usize);
    let r = t
        .on_reactor(move || async move {
            let ch = desc.channel().ok()?;
            let c = ch.read(0, IoBuf::new(len)).await;
            c.status.ok()?;
            c.buf
        })
        .await
        .ok()
        .flatten()?;
    BackingHeaderOnDisk::decode(&r[..BackingHeaderOnDisk::SIZE]).ok()
}

/// `bdev_cache_load`: the cache set on `cache_bdev_name`, with its core bdev found by the
/// backing header that names this set (or given), in the mode the superblock records.
async fn load(t: &Arc<Target>, p: BdevCacheLoadParams) -> Result<String, RpcError> {
    let Some(name) = p.name.clone() else {
        return Err(RpcError::invalid_argument(
            "the superblock does not record bdev names: pass \"name\" for the cached bdev",
        ));
    };
    let core = match p.core_bdev_name.clone() {
        Some(c) => c,
        None => find_core(t, &p.cache_bdev_name).await?,
    };
    let args = CreateArgs {
        name,
        mode: None,
        cache: p.cache_bdev_name,
        core,
        segment_size_kib: None,
        format: false,
        block_size: None,
    };
    create(t, args).await
}

/// The one unclaimed bdev whose backing header belongs to the cache set on `cache`.
async fn find_core(t: &Target, cache: &str) -> Result<String, RpcError> {
    let cache_desc = t.open(cache)?;
    let head = {
        let d = cache_desc.clone();
        t.on_reactor(move || async move {
            let ch = d.channel().ok()?;
            let c = ch.read(0, IoBuf::new(4096)).await;
            c.status.ok()?;
            c.buf
        })
        .await?
    };
    let set_uuid = head
        .and_then(|h| tiercache_engine::cache::ondisk::SuperblockOnDisk::decode(&h).ok())
        .map(|sb| sb.cache_set())
        .ok_or_else(|| {
            RpcError::from_errno(libc::EILSEQ, format!("bdev {cache} does not start with a valid tiercache superblock"))
        })?;
    let mut found = Vec::new();
    for b in t.bdevs.list() {
        let n = b.info().name.clone();
        if n == cache || t.bdevs.claimed_by(&n).is_some() {
            continue;
        }
        let Ok(desc) = t.bdevs.open(&n) else { continue };
        if backing_header(t, desc).await.is_some_and(|h| h.cache_set() == set_uuid) {
            found.push(n);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(RpcError::no_device(format!(
            "no unclaimed bdev carries a backing header of the cache set on {cache}; pass \"core_bdev_name\""
        ))),
        _ => Err(RpcError::invalid_argument(format!(
            "several bdevs belong to the cache set on {cache} ({}); pass \"core_bdev_name\"",
            found.join(", ")
        ))),
    }
}

async fn delete(t: &Arc<Target>, name: &str) -> Result<bool, RpcError> {
    let (desc, set) = t.cached_bdev(name)?;
    t.check_deletable(name)?;
    let key = t.cache_key_of(&set).ok_or_else(|| RpcError::internal(format!("no cache set entry for {name}")))?;
    let others: Vec<String> = lock(&t.caches)
        .get(&key)
        .map(|e| e.members.iter().filter(|m| *m != name).cloned().collect())
        .unwrap_or_default();
    // Everything written through it reaches the cache device before it goes away.
    let d = desc.clone();
    t.on_reactor(move || async move {
        let ch = d.channel()?;
        ch.flush().await.status
    })
    .await?
    .map_err(|e| crate::target::errno_err(e, format!("cannot flush {name} before deleting it")))?;
    if !others.is_empty() {
        // The set stays up for the others. The engine cannot detach a backing device yet,
        // so this one may only leave once nothing of it is dirty in the shared log.
        let dirty = set.dirty_blocks();
        if dirty > 0 {
            return Err(RpcError::busy(format!(
                "the cache set on {key} (shared with {}) holds {dirty} dirty blocks; flush it first \
                 (bdev_cache_flush_start, then wait for bdev_cache_flush_status to report done)",
                others.join(", ")
            )));
        }
    }
    let desc = t.unregister(name).await?;
    let core = desc
        .bdev()
        .as_any()
        .downcast_ref::<CachedBdev>()
        .map(|cb| cb.backing().desc.name().to_string())
        .unwrap_or_default();
    t.bdevs.release(&core, name);
    let entry = {
        let mut caches = lock(&t.caches);
        if others.is_empty() {
            caches.remove(&key)
        } else {
            if let Some(e) = caches.get_mut(&key) {
                e.members.retain(|m| m != name);
                e.retired_cores.push(core.clone());
            }
            None
        }
    };
    if let Some(e) = entry {
        e.set.stop_migration();
        t.bdevs.release(&key, &e.claimer);
        log::info!("cache set on {key} closed ({} dirty blocks stay in its log)", e.set.dirty_blocks());
    }
    lock(&t.stats_base).remove(name);
    log::info!("cached bdev {name} deleted");
    Ok(true)
}

fn get_bdevs(t: &Arc<Target>, p: BdevCacheGetBdevsParams) -> Result<Vec<Value>, RpcError> {
    let caches = lock(&t.caches);
    let mut out = Vec::new();
    for (key, e) in caches.iter() {
        for m in &e.members {
            let Some(b) = t.bdevs.get(m) else { continue };
            let Some(cb) = b.as_any().downcast_ref::<CachedBdev>() else { continue };
            let core = cb.backing().desc.name().to_string();
            if let Some(n) = &p.name {
                if n != m && *n != core && n != key {
                    continue;
                }
            }
            out.push(json!({
                "name": m,
                "mode": mode_name(cb.mode()),
                "cache_bdev_name": key,
                "core_bdev_name": core,
                "cache_set_uuid": e.set.uuid.to_string(),
                "backing_uuid": cb.backing().uuid.to_string(),
                "block_size": b.info().block_size,
                "num_blocks": b.info().num_blocks,
                "segment_size_kib": e.segment_size_kib,
                "origin": e.origin,
                "shared_with": e.members.iter().filter(|x| *x != m).collect::<Vec<_>>(),
                "failed": e.set.is_failed(),
            }));
        }
    }
    if out.is_empty() {
        if let Some(n) = p.name {
            return Err(RpcError::no_device(format!("no cached bdev named {n} or built on {n}")));
        }
    }
    Ok(out)
}

/// Occupancy of a set: (live blocks, dirty blocks, capacity in blocks).
fn occupancy(set: &CacheSet) -> (u64, u64, u64) {
    let (mut live, mut dirty) = (0u64, 0u64);
    for k in 0..set.nr_segments() {
        if let Ok(i) = set.index().segment_info(SegmentId(k)) {
            live += u64::from(i.live);
            dirty += u64::from(i.dirty);
        }
    }
    (live, dirty, u64::from(set.nr_segments()) * u64::from(set.geometry().slots_per_segment()))
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 10000.0 / whole as f64).round() / 100.0
    }
}

fn sub(a: &IoStats, b: &IoStats) -> IoStats {
    IoStats {
        num_read_ops: a.num_read_ops.saturating_sub(b.num_read_ops),
        bytes_read: a.bytes_read.saturating_sub(b.bytes_read),
        num_write_ops: a.num_write_ops.saturating_sub(b.num_write_ops),
        bytes_written: a.bytes_written.saturating_sub(b.bytes_written),
        num_unmap_ops: a.num_unmap_ops.saturating_sub(b.num_unmap_ops),
        bytes_unmapped: a.bytes_unmapped.saturating_sub(b.bytes_unmapped),
        num_write_zeroes_ops: a.num_write_zeroes_ops.saturating_sub(b.num_write_zeroes_ops),
        bytes_write_zeroes: a.bytes_write_zeroes.saturating_sub(b.bytes_write_zeroes),
        num_flush_ops: a.num_flush_ops.saturating_sub(b.num_flush_ops),
        num_errors: a.num_errors.saturating_sub(b.num_errors),
        num_retries: a.num_retries.saturating_sub(b.num_retries),
        num_rejected: a.num_rejected.saturating_sub(b.num_rejected),
    }
}

async fn get_stats(t: &Arc<Target>, name: &str) -> Result<Value, RpcError> {
    let (desc, set) = t.cached_bdev(name)?;
    let mode = desc.bdev().as_any().downcast_ref::<CachedBdev>().map(|cb| mode_name(cb.mode())).unwrap_or("");
    let io = desc.iostat(&t.reactors).await;
    let base = lock(&t.stats_base).get(name).copied().unwrap_or_default();
    let io = sub(&io, &base);
    let (live, dirty, capacity) = occupancy(&set);
    let sb = set.superblock();
    let key = t.cache_key_of(&set).unwrap_or_default();
    Ok(json!({
        "name": name,
        "mode": mode,
        "cache_set": {
            "cache_bdev_name": key,
            "uuid": set.uuid.to_string(),
            "block_size": set.block_size(),
            "segment_size": set.geometry().segment_size(),
            "nr_segments": set.nr_segments(),
            "free_segments": set.free_segments(),
            "capacity_blocks": capacity,
            "live_blocks": live,
            "dirty_blocks": dirty,
            "occupancy_percent": pct(live, capacity),
            "dirty_percent": pct(dirty, capacity),
            "writeback_seq": sb.writeback_seq,
            "failed": set.is_failed(),
        },
        "io": iostat_json(name, &io),
    }))
}

fn set_options(t: &Arc<Target>, p: BdevCacheSetOptionsParams) -> Result<bool, RpcError> {
    let (_, set) = t.cached_bdev(&p.name)?;
    let mut unsupported = Vec::new();
    let knobs: [(&str, bool); 8] = [
        ("writeback_percent", p.writeback_percent.is_some()),
        ("writeback_rate_min", p.writeback_rate_min.is_some()),
        ("writeback_rate_max", p.writeback_rate_max.is_some()),
        ("io_error_limit", p.io_error_limit.is_some()),
        ("io_error_halflife", p.io_error_halflife.is_some()),
        ("stop_when_cache_set_failed", p.stop_when_cache_set_failed.is_some()),
        ("backing_offline_grace_ms", p.backing_offline_grace_ms.is_some()),
        ("promote_after_hits", p.promote_after_hits.is_some()),
    ];
    for (k, given) in knobs {
        if given {
            unsupported.push(k);
        }
    }
    if !unsupported.is_empty() {
        // Nothing is applied: the call is all or nothing.
        return Err(not_supported(format!("bdev_cache_set_options {}", unsupported.join(", "))));
    }
    if let Some(ms) = p.seal_idle_ms {
        let mut o = set.options();
        o.seal_idle = std::time::Duration::from_millis(ms.max(1));
        set.set_options(o);
        log::info!("{}: seal_idle set to {ms} ms", p.name);
    }
    Ok(true)
}

fn flush_status(t: &Arc<Target>, name: &str) -> Result<Value, RpcError> {
    let (_, set) = t.cached_bdev(name)?;
    let dirty = set.dirty_blocks();
    let bs = u64::from(set.block_size());
    let progress = t.cache_key_of(&set).and_then(|k| lock(&t.caches).get(&k).and_then(|e| e.flush));
    let done = dirty == 0;
    let mut v = json!({
        "done": done,
        "dirty_blocks": dirty,
        "dirty_bytes": dirty * bs,
    });
    match progress {
        None => {
            v["state"] = json!(if done { "clean" } else { "dirty (no flush requested)" });
            v["percent"] = json!(if done { 100.0 } else { 0.0 });
        }
        Some(f) => {
            let elapsed = f.started.elapsed().as_secs_f64();
            let written = f.dirty_at_start.saturating_sub(dirty);
            let percent = if f.dirty_at_start == 0 || done { 100.0 } else { pct(written, f.dirty_at_start) };
            let rate = if elapsed > 0.0 { written as f64 / elapsed } else { 0.0 };
            v["state"] = json!(if done { "done" } else { "flushing" });
            v["percent"] = json!(percent);
            v["rate_blocks_per_sec"] = json!((rate * 10.0).round() / 10.0);
            v["rate_bytes_per_sec"] = json!((rate * bs as f64).round());
            v["elapsed_sec"] = json!((elapsed * 1000.0).round() / 1000.0);
            if !done && rate > 0.0 {
                v["eta_sec"] = json!(((dirty as f64 / rate) * 10.0).round() / 10.0);
            }
        }
    }
    if set.is_failed() {
        v["error"] = json!("the cache device has failed; dirty data cannot be written back");
    }
    Ok(v)
}
