//! Cache methods (modelled on SPDK's `bdev_ocf_*`): create / load / delete cached bdevs,
//! stats, cache mode, options and sequential cut-off, flush (drain of dirty data) and
//! detach with progress, re-attach. What the engine has no knob for (the seq-cutoff
//! promotion count) answers `-EOPNOTSUPP`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tiercache_engine::bdev::IoStats;
use tiercache_engine::cache::index::SegmentId;
use tiercache_engine::cache::ondisk::{BackingHeaderOnDisk, FormatError, DEFAULT_DATA_OFFSET};
use tiercache_engine::cache::rate::Decision;
use tiercache_engine::cache::set::{Backing, SetCounters};
use tiercache_engine::cache::{
    self, mode_name, BackingState, CacheError, CacheMode, CacheOptions, CacheSet, CachedBdev, SeqCutoffPolicy,
    StopPolicy,
};
use tiercache_engine::{Errno, IoBuf};
use tiercache_jsonrpc::config::ConfigEntry;
use tiercache_jsonrpc::schema::{
    self as s, BdevCacheAttachParams, BdevCacheCreateParams, BdevCacheGetBdevsParams, BdevCacheLoadParams,
    BdevCacheSetCacheModeParams, BdevCacheSetOptionsParams, BdevCacheSetSeqcutoffParams, NameParams,
};
use tiercache_jsonrpc::RpcError;

use super::bdev::{claim, iostat_json};
use super::{not_supported, reg};
use crate::target::{errno_err, lock, CacheSetEntry, DetachProgress, FlushProgress, Target};

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
        let (desc, set) = t.cached_bdev(&p.name)?;
        let now = desc.iostat(&t.reactors).await;
        lock(&t.stats_base).insert(p.name, now);
        if let Some(key) = t.cache_key_of(&set) {
            if let Some(e) = lock(&t.caches).get_mut(&key) {
                e.counters_base = Some(counters(&set));
            }
        }
        set.reset_latency().await;
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
    reg(t, "bdev_cache_set_seqcutoff", |t, p: BdevCacheSetSeqcutoffParams| async move { set_seqcutoff(&t, p) })?;
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
        let _g = t.ops.lock().await;
        detach(&t, &p.name)
    })?;
    reg(t, "bdev_cache_attach", |t, p: BdevCacheAttachParams| async move {
        let _g = t.ops.lock().await;
        attach(&t, p).await
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
                counters_base: None,
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
    let backing = desc.bdev().as_any().downcast_ref::<CachedBdev>().map(|cb| cb.backing().clone());
    let dead = backing.as_ref().is_some_and(|b| b.state() == BackingState::Stopped);
    if dead {
        // A stopped (dead) cached bdev fails every I/O, FLUSH included; it can still go.
        log::warn!("{name} is stopped (dead): deleting it without a flush");
    } else {
        // Everything written through it reaches the cache device before it goes away.
        let d = desc.clone();
        t.on_reactor(move || async move {
            let ch = d.channel()?;
            ch.flush().await.status
        })
        .await?
        .map_err(|e| crate::target::errno_err(e, format!("cannot flush {name} before deleting it")))?;
    }
    if !others.is_empty() && !dead {
        // The set stays up for the others and keeps this backing device registered, so
        // this one may only leave once nothing of it is dirty in the shared log.
        let dirty = backing.as_ref().map_or_else(|| set.dirty_blocks(), |b| set.dirty_blocks_of(b.idx));
        if dirty > 0 {
            return Err(RpcError::busy(format!(
                "{name} has {dirty} dirty blocks in the cache set on {key} (shared with {}); flush it first \
                 (bdev_cache_flush_start, then wait for bdev_cache_flush_status to report done) or detach it",
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
    lock(&t.detaches).remove(name);
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
                "state": cb.backing().state().name(),
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
    let cb = desc
        .bdev()
        .as_any()
        .downcast_ref::<CachedBdev>()
        .ok_or_else(|| RpcError::no_device(format!("bdev {name} is not a cached bdev")))?;
    let mode = mode_name(cb.mode());
    let backing = cb.backing().clone();
    let io = desc.iostat(&t.reactors).await;
    let base = lock(&t.stats_base).get(name).copied().unwrap_or_default();
    let io = sub(&io, &base);
    let (live, dirty, capacity) = occupancy(&set);
    let sb = set.superblock();
    let key = t.cache_key_of(&set).unwrap_or_default();
    let counters_base = lock(&t.caches).get(&key).and_then(|e| e.counters_base.clone());
    let mut ctr = serde_json::Map::new();
    for (k, v) in counters(&set) {
        let b = counters_base.as_ref().and_then(|b| b.iter().find(|(n, _)| *n == k)).map_or(0, |(_, b)| *b);
        ctr.insert(k.to_string(), json!(v.saturating_sub(b)));
    }
    let own_dirty = set.dirty_blocks_of(backing.idx);
    let bs = u64::from(set.block_size());
    let latency = set.latency().await.summary();
    let mut members = Vec::new();
    if let Some(e) = lock(&t.caches).get(&key) {
        for m in &e.members {
            let Some(b) = t.bdevs.get(m) else { continue };
            let Some(mcb) = b.as_any().downcast_ref::<CachedBdev>() else { continue };
            members.push(json!({"name": m, "state": mcb.backing().state().name(), "mode": mode_name(mcb.mode())}));
        }
    }
    Ok(json!({
        "name": name,
        "mode": mode,
        "state": backing.state().name(),
        "core_bdev_name": backing.desc.name(),
        "dirty_blocks": own_dirty,
        "dirty_bytes": own_dirty * bs,
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
            "members": members,
            "options": options_json(&set.options()),
            "writeback_rate": match set.writeback_rate() {
                Decision::Idle => json!("idle"),
                Decision::Unlimited => json!("unlimited"),
                Decision::Rate(r) => json!(r as u64),
            },
            "writeback_guard": set.tail_guard_state().to_json(),
        },
        "counters": Value::Object(ctr),
        "latency_us": latency,
        "io": iostat_json(name, &io),
    }))
}

/// Every counter of the set, by name. The destructuring names every field, so a counter
/// added to the engine does not compile here until it is reported.
pub fn counters(set: &CacheSet) -> Vec<(&'static str, u64)> {
    let SetCounters {
        read_hits,
        read_partial_hits,
        read_misses,
        write_blocks,
        write_overwrites_in_buffer,
        segments_sealed,
        segments_written,
        segment_write_errors,
        conflict_seals,
        flushes,
        writeback_blocks,
        segments_reclaimed,
        space_waits,
        promotions,
        promotions_stale,
        promotions_skipped,
        // A gauge, not a count: not reported here (a stats reset would subtract it).
        promotions_in_flight: _,
        copy_forwards,
        copy_forwards_dropped,
        seq_bypasses,
        full_bypasses,
    } = &set.counters;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    vec![
        ("read_hits", g(read_hits)),
        ("read_partial_hits", g(read_partial_hits)),
        ("read_misses", g(read_misses)),
        ("write_blocks", g(write_blocks)),
        ("write_overwrites_in_buffer", g(write_overwrites_in_buffer)),
        ("segments_sealed", g(segments_sealed)),
        ("segments_written", g(segments_written)),
        ("segment_write_errors", g(segment_write_errors)),
        ("conflict_seals", g(conflict_seals)),
        ("flushes", g(flushes)),
        ("writeback_blocks", g(writeback_blocks)),
        ("segments_reclaimed", g(segments_reclaimed)),
        ("space_waits", g(space_waits)),
        ("promotions", g(promotions)),
        ("promotions_stale", g(promotions_stale)),
        ("promotions_skipped", g(promotions_skipped)),
        ("copy_forwards", g(copy_forwards)),
        ("copy_forwards_dropped", g(copy_forwards_dropped)),
        ("seq_bypasses", g(seq_bypasses)),
        ("full_bypasses", g(full_bypasses)),
    ]
}

fn policy_name(p: SeqCutoffPolicy) -> &'static str {
    match p {
        SeqCutoffPolicy::Always => "always",
        SeqCutoffPolicy::Full => "full",
        SeqCutoffPolicy::Never => "never",
    }
}

fn stop_policy_name(p: StopPolicy) -> &'static str {
    match p {
        StopPolicy::Auto => "auto",
        StopPolicy::Always => "always",
    }
}

/// The options of a set as `bdev_cache_get_stats` shows them (RPC names and units).
fn options_json(o: &CacheOptions) -> Value {
    json!({
        "seal_idle_ms": o.seal_idle.as_millis() as u64,
        "io_error_limit": o.cache_io_error_limit,
        "backing_io_error_limit": o.backing_io_error_limit,
        "io_error_halflife": o.io_error_halflife.as_secs(),
        "stop_when_cache_set_failed": stop_policy_name(o.stop_when_cache_set_failed),
        "backing_offline_grace_ms": o.backing_offline_grace.as_millis() as u64,
        "promote_after_hits": o.promote_after,
        "seq_cutoff_policy": policy_name(o.seq_cutoff_policy),
        "seq_cutoff_threshold_kib": o.seq_cutoff_bytes / 1024,
        "writeback_free_low_percent": o.writeback_free_low_percent,
        "writeback_percent": o.writeback_percent,
        "dirty_write_cutoff_percent": o.dirty_write_cutoff_percent,
        "writeback_rate_min": o.writeback_rate_min,
        "writeback_rate_max": o.writeback_rate_max,
        "space_wait_limit_ms": o.space_wait_limit.as_millis() as u64,
    })
}

/// The calls that restore a set's options that differ from the defaults (for save_config:
/// they follow the `bdev_cache_create` of the set's first cached bdev `name`).
pub fn options_config(name: &str, o: &CacheOptions) -> Vec<ConfigEntry> {
    let d = CacheOptions::default();
    let mut out = Vec::new();
    let mut p = serde_json::Map::new();
    if o.seal_idle != d.seal_idle {
        p.insert("seal_idle_ms".into(), json!((o.seal_idle.as_millis() as u64).max(1)));
    }
    // One RPC knob sets both limits; a differing pair cannot come from the RPC.
    if o.cache_io_error_limit != d.cache_io_error_limit || o.backing_io_error_limit != d.backing_io_error_limit {
        p.insert("io_error_limit".into(), json!(o.cache_io_error_limit));
    }
    if o.io_error_halflife != d.io_error_halflife {
        p.insert("io_error_halflife".into(), json!(o.io_error_halflife.as_secs().clamp(1, u64::from(u32::MAX))));
    }
    if o.stop_when_cache_set_failed != d.stop_when_cache_set_failed {
        p.insert("stop_when_cache_set_failed".into(), json!(stop_policy_name(o.stop_when_cache_set_failed)));
    }
    if o.backing_offline_grace != d.backing_offline_grace {
        p.insert("backing_offline_grace_ms".into(), json!(o.backing_offline_grace.as_millis() as u64));
    }
    if o.promote_after != d.promote_after {
        p.insert("promote_after_hits".into(), json!(o.promote_after));
    }
    if o.writeback_percent != d.writeback_percent {
        p.insert("writeback_percent".into(), json!(o.writeback_percent));
    }
    if o.dirty_write_cutoff_percent != d.dirty_write_cutoff_percent {
        p.insert("dirty_write_cutoff_percent".into(), json!(o.dirty_write_cutoff_percent));
    }
    if o.writeback_rate_min != d.writeback_rate_min {
        p.insert("writeback_rate_min".into(), json!(o.writeback_rate_min));
    }
    if o.writeback_rate_max != d.writeback_rate_max {
        p.insert("writeback_rate_max".into(), json!(o.writeback_rate_max));
    }
    if !p.is_empty() {
        p.insert("name".into(), json!(name));
        out.push(ConfigEntry { method: "bdev_cache_set_options".into(), params: Some(Value::Object(p)) });
    }
    if o.seq_cutoff_policy != d.seq_cutoff_policy || o.seq_cutoff_bytes != d.seq_cutoff_bytes {
        let mut p = json!({"name": name, "policy": policy_name(o.seq_cutoff_policy)});
        let kib = o.seq_cutoff_bytes / 1024;
        if (1..=4_194_181).contains(&kib) {
            p["threshold"] = json!(kib);
        } else if o.seq_cutoff_bytes == 0 {
            // Threshold 0 switches the cut-off off whatever the policy.
            p["policy"] = json!("never");
        }
        out.push(ConfigEntry { method: "bdev_cache_set_seqcutoff".into(), params: Some(p) });
    }
    out
}

fn set_options(t: &Arc<Target>, p: BdevCacheSetOptionsParams) -> Result<bool, RpcError> {
    let (_, set) = t.cached_bdev(&p.name)?;
    let mut o = set.options();
    let mut applied = Vec::new();
    if let Some(ms) = p.seal_idle_ms {
        o.seal_idle = Duration::from_millis(ms.max(1));
        applied.push(format!("seal_idle_ms={ms}"));
    }
    if let Some(n) = p.io_error_limit {
        o.cache_io_error_limit = n;
        o.backing_io_error_limit = n;
        applied.push(format!("io_error_limit={n}"));
    }
    if let Some(secs) = p.io_error_halflife {
        o.io_error_halflife = Duration::from_secs(u64::from(secs));
        applied.push(format!("io_error_halflife={secs}s"));
    }
    if let Some(sp) = p.stop_when_cache_set_failed {
        o.stop_when_cache_set_failed = match sp {
            s::StopWhenCacheSetFailed::Auto => StopPolicy::Auto,
            s::StopWhenCacheSetFailed::Always => StopPolicy::Always,
        };
        applied.push(format!("stop_when_cache_set_failed={}", sp.as_str()));
    }
    if let Some(ms) = p.backing_offline_grace_ms {
        o.backing_offline_grace = Duration::from_millis(ms);
        applied.push(format!("backing_offline_grace_ms={ms}"));
    }
    if let Some(n) = p.promote_after_hits {
        o.promote_after = n;
        applied.push(format!("promote_after_hits={n}"));
    }
    if let Some(pct) = p.writeback_percent {
        o.writeback_percent = u32::from(pct);
        applied.push(format!("writeback_percent={pct}"));
    }
    if let Some(pct) = p.dirty_write_cutoff_percent {
        o.dirty_write_cutoff_percent = u32::from(pct);
        applied.push(format!("dirty_write_cutoff_percent={pct}"));
    }
    if let Some(r) = p.writeback_rate_min {
        o.writeback_rate_min = r;
        applied.push(format!("writeback_rate_min={r}"));
    }
    if let Some(r) = p.writeback_rate_max {
        o.writeback_rate_max = r;
        applied.push(format!("writeback_rate_max={r}"));
    }
    if o.writeback_rate_max < o.writeback_rate_min {
        return Err(RpcError::invalid_params(
            "writeback_rate_max: must be >= writeback_rate_min (the set's current value included)",
        ));
    }
    set.set_options(o);
    log::info!("{}: cache set options: {}", p.name, applied.join(", "));
    Ok(true)
}

fn set_seqcutoff(t: &Arc<Target>, p: BdevCacheSetSeqcutoffParams) -> Result<bool, RpcError> {
    let (_, set) = t.cached_bdev(&p.name)?;
    if p.promotion_count.is_some() {
        return Err(not_supported(
            "bdev_cache_set_seqcutoff promotion_count (the engine counts a stream by its contiguous bytes, not \
             by a number of requests)",
        ));
    }
    let mut o = set.options();
    o.seq_cutoff_policy = match p.policy {
        s::SeqCutoffPolicy::Always => SeqCutoffPolicy::Always,
        s::SeqCutoffPolicy::Full => SeqCutoffPolicy::Full,
        s::SeqCutoffPolicy::Never => SeqCutoffPolicy::Never,
    };
    if let Some(kib) = p.threshold {
        o.seq_cutoff_bytes = u64::from(kib) * 1024;
    }
    let bytes = o.seq_cutoff_bytes;
    set.set_options(o);
    log::info!("{}: sequential cut-off {} above {} KiB", p.name, p.policy, bytes / 1024);
    Ok(true)
}

/// `bdev_cache_detach`: writes bypass the cache from now on, the bdev's dirty data is
/// written back in the background, then it runs with zero I/O to the cache device.
/// Returns at once; `bdev_cache_flush_status` reports the progress.
fn detach(t: &Arc<Target>, name: &str) -> Result<bool, RpcError> {
    let (desc, set) = t.cached_bdev(name)?;
    let cb = desc
        .bdev()
        .as_any()
        .downcast_ref::<CachedBdev>()
        .ok_or_else(|| RpcError::no_device(format!("bdev {name} is not a cached bdev")))?;
    let b = cb.backing().clone();
    let before = b.state();
    if before == BackingState::Running {
        let dirty = set.dirty_blocks_of(b.idx);
        lock(&t.detaches).insert(name.to_string(), DetachProgress { started: Instant::now(), dirty_at_start: dirty });
    }
    set.detach(&b).map_err(|e| {
        lock(&t.detaches).remove(name);
        errno_err(e, format!("cannot detach {name} (state {})", b.state().name()))
    })?;
    if before != BackingState::Running {
        lock(&t.detaches)
            .entry(name.to_string())
            .or_insert(DetachProgress { started: Instant::now(), dirty_at_start: 0 });
    }
    log::info!("{name}: detach requested (was {}, now {})", before.name(), b.state().name());
    Ok(true)
}

/// `bdev_cache_attach`: re-attach a detached cached bdev to its cache set. The engine
/// keeps the old backing slot (detached) in the set, so the backing device joins again as
/// a fresh backing device: its tiercache header is cleared, the set registers it under a
/// new index and UUID (same data offset, so its data stays where it is), and a new
/// cached bdev replaces the old one under the same name, in the same cache mode.
async fn attach(t: &Arc<Target>, p: BdevCacheAttachParams) -> Result<bool, RpcError> {
    let name = p.name.as_str();
    let (desc, set) = t.cached_bdev(name)?;
    let cb = desc
        .bdev()
        .as_any()
        .downcast_ref::<CachedBdev>()
        .ok_or_else(|| RpcError::no_device(format!("bdev {name} is not a cached bdev")))?;
    let old = cb.backing().clone();
    let mode = cb.mode();
    t.open(&p.cache_bdev_name)?;
    let key = t.cache_key_of(&set).unwrap_or_default();
    if p.cache_bdev_name != key {
        return Err(not_supported(format!(
            "attaching {name} to the cache on {} (it can only re-attach to its own cache set on {key})",
            p.cache_bdev_name
        )));
    }
    if p.format {
        return Err(RpcError::busy(format!(
            "bdev {key} holds the running cache set of {name}; \"format\": true would destroy it"
        )));
    }
    match old.state() {
        BackingState::Detached => {}
        BackingState::Running => {
            return Err(RpcError::from_errno(libc::EALREADY, format!("{name} is attached to its cache already")))
        }
        BackingState::Detaching => {
            return Err(RpcError::busy(format!(
                "{name} is still detaching; wait for bdev_cache_flush_status to report done"
            )))
        }
        st => {
            let why = if set.is_failed() { "its cache set has failed" } else { "it is not detached" };
            return Err(RpcError::from_errno(
                libc::EIO,
                format!("{name} cannot be re-attached: {why} (state {}); delete it instead", st.name()),
            ));
        }
    }
    if set.is_failed() {
        return Err(RpcError::from_errno(libc::EIO, format!("the cache set on {key} has failed")));
    }
    if old.data_offset != DEFAULT_DATA_OFFSET {
        return Err(not_supported(format!(
            "re-attaching {name}: its data starts at byte {} of its backing device, a fresh backing device at {}",
            old.data_offset, DEFAULT_DATA_OFFSET
        )));
    }
    t.check_deletable(name)?;
    let core = old.desc.name().to_string();
    let core_desc = t.open(&core)?;
    let hdr_len = 4096usize.max(core_desc.bdev().info().block_size as usize);
    // Keep the header to put it back if the attach fails.
    let saved = {
        let d = core_desc.clone();
        t.on_reactor(move || async move {
            let ch = d.channel()?;
            let c = ch.read(0, IoBuf::new(hdr_len)).await;
            c.status?;
            c.buf.ok_or(Errno::EIO)
        })
        .await?
        .map_err(|e| errno_err(e, format!("cannot read the backing header of {core}")))?
    };
    let write_hdr = |bytes: IoBuf| {
        let d = core_desc.clone();
        t.on_reactor(move || async move {
            let ch = d.channel()?;
            let c = ch.write(0, bytes, true).await;
            c.status?;
            ch.flush().await.status
        })
    };
    write_hdr(IoBuf::zeroed(hdr_len))
        .await?
        .map_err(|e| errno_err(e, format!("cannot clear the backing header of {core}")))?;
    let (s2, d2) = (set.clone(), core_desc.clone());
    let r = t.on_reactor(move || async move { s2.attach(d2, mode).await }).await;
    let backing = match r {
        Ok(Ok(b)) if b.num_blocks == old.num_blocks => b,
        other => {
            let what = match &other {
                Ok(Ok(b)) => format!("its size changed ({} blocks, was {})", b.num_blocks, old.num_blocks),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.message.clone(),
            };
            if let Ok(Ok(b)) = &other {
                // Never used: no I/O went through it.
                if let Err(e) = set.detach(b) {
                    log::error!("{name}: cannot retire the new backing slot {}: {e}", b.idx.0);
                }
            }
            if let Ok(Err(e)) = write_hdr(saved).await {
                log::error!("{name}: cannot restore the backing header of {core}: {e}");
            }
            let errno = match &other {
                Ok(Err(e)) => e.errno().0,
                Err(e) => -e.code,
                Ok(Ok(_)) => libc::EINVAL,
            };
            return Err(RpcError::from_errno(
                errno,
                format!("cannot re-attach {core} to the cache set on {key}: {what}"),
            ));
        }
    };
    // Swap the cached bdev registered under `name`.
    t.unregister(name).await?;
    let bdev = CachedBdev::new(name, set.clone(), backing.clone());
    if let Err(e) = t.bdevs.register(bdev) {
        log::error!("{name}: cannot register the re-attached cached bdev: {e}; putting the detached one back");
        let _ = t.bdevs.register(CachedBdev::new(name, set.clone(), old.clone()));
        let _ = set.detach(&backing);
        return Err(errno_err(e, format!("cannot register bdev {name}")));
    }
    lock(&t.detaches).remove(name);
    lock(&t.stats_base).remove(name);
    log::info!(
        "{name}: re-attached to the cache set on {key} as backing device {} ({}), mode {}",
        backing.idx.0,
        backing.uuid,
        mode_name(mode)
    );
    Ok(true)
}

fn flush_status(t: &Arc<Target>, name: &str) -> Result<Value, RpcError> {
    let (desc, set) = t.cached_bdev(name)?;
    let backing = desc.bdev().as_any().downcast_ref::<CachedBdev>().map(|cb| cb.backing().clone());
    let progress = t.cache_key_of(&set).and_then(|k| lock(&t.caches).get(&k).and_then(|e| e.flush));
    let detach = lock(&t.detaches).get(name).copied();
    if let (Some(d), Some(b)) = (detach, &backing) {
        if progress.is_none_or(|f| f.started <= d.started) {
            return Ok(detach_status(&set, b, d));
        }
    }
    let dirty = set.dirty_blocks();
    let bs = u64::from(set.block_size());
    let done = dirty == 0;
    let mut v = json!({
        "done": done,
        "dirty_blocks": dirty,
        "dirty_bytes": dirty * bs,
    });
    if let Some(b) = &backing {
        v["bdev_state"] = json!(b.state().name());
    }
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

/// The progress of a detach, in the ProgressStatus contract: done once the bdev is
/// detached; an error if it left the detaching state any other way (stopped, failed set).
fn detach_status(set: &CacheSet, b: &Backing, d: DetachProgress) -> Value {
    let st = set.detach_status(b);
    let bs = u64::from(set.block_size());
    let elapsed = d.started.elapsed().as_secs_f64();
    let percent = if st.done || d.dirty_at_start == 0 {
        if st.done {
            100.0
        } else {
            0.0
        }
    } else {
        pct(d.dirty_at_start.saturating_sub(st.dirty_blocks), d.dirty_at_start)
    };
    let mut v = json!({
        "done": st.done,
        "operation": "detach",
        "state": st.state,
        "bdev_state": st.state,
        "percent": percent,
        "dirty_blocks": st.dirty_blocks,
        "dirty_bytes": st.dirty_blocks * bs,
        "elapsed_sec": (elapsed * 1000.0).round() / 1000.0,
    });
    let state = b.state();
    if !matches!(state, BackingState::Detaching | BackingState::Detached) {
        v["error"] = json!(format!(
            "the detach did not complete: the cached bdev is {}{}",
            state.name(),
            if set.is_failed() { " (its cache set failed)" } else { "" }
        ));
    }
    v
}
