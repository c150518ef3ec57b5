//! Bdev methods with SPDK's names and result shapes: `bdev_get_bdevs`, `bdev_get_iostat`,
//! and create / delete of malloc, null, uring, error and delay bdevs, plus
//! `bdev_error_inject_error` and `bdev_delay_update_latency`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tiercache_bdevs::delay::{DelayBdev, DelayLatencies, LatencyKind};
use tiercache_bdevs::error::{ErrorBdev, ErrorKind, ErrorSpec, Trigger};
use tiercache_bdevs::malloc::MallocBdev;
use tiercache_bdevs::null::NullBdev;
use tiercache_bdevs::uring::UringBdev;
use tiercache_engine::bdev::{Bdev, BdevDesc, IoStats, IoType};
use tiercache_engine::Errno;
use tiercache_jsonrpc::schema::{
    BdevDelayCreateParams, BdevDelayUpdateLatencyParams, BdevErrorCreateParams, BdevErrorInjectErrorParams,
    BdevGetBdevsParams, BdevGetIostatParams, BdevMallocCreateParams, BdevNullCreateParams, BdevUringCreateParams,
    DelayLatencyType, ErrorIoType, ErrorType, NameParams,
};
use tiercache_jsonrpc::RpcError;

use super::{not_supported, reg, reg_pre};
use crate::methods::framework::TICK_RATE;
use crate::target::{errno_err, Target};

pub fn register(t: &Arc<Target>) -> Result<(), RpcError> {
    reg(t, "bdev_get_bdevs", |t, p: BdevGetBdevsParams| async move { get_bdevs(&t, p).await })?;
    reg_pre(t, "bdev_get_iostat", iostat_spdk_extras, |t, p: IostatArgs| async move { get_iostat(&t, p).await })?;

    reg(t, "bdev_malloc_create", |t, p: BdevMallocCreateParams| async move {
        let _g = t.ops.lock().await;
        let name = match p.name {
            Some(n) => n,
            None => next_malloc_name(&t),
        };
        let (num_blocks, block_size) = (p.num_blocks, p.block_size);
        let uuid = p.uuid.unwrap_or_else(uuid::Uuid::new_v4);
        let n = name.clone();
        let b = t
            .on_reactor(move || async move { MallocBdev::create_with_uuid(&n, num_blocks, block_size, uuid) })
            .await?
            .map_err(|e| create_err(e, &name, "malloc"))?;
        add_bdev(&t, b)
    })?;
    reg(t, "bdev_malloc_delete", |t, p: NameParams| async move { delete(&t, &p.name, "malloc").await })?;

    reg(t, "bdev_null_create", |t, p: BdevNullCreateParams| async move {
        let _g = t.ops.lock().await;
        let (name, num_blocks, block_size) = (p.name.clone(), p.num_blocks, p.block_size);
        let uuid = p.uuid.unwrap_or_else(uuid::Uuid::new_v4);
        let b = t
            .on_reactor(move || async move { NullBdev::create_with_uuid(&name, num_blocks, block_size, uuid) })
            .await?
            .map_err(|e| create_err(e, &p.name, "null"))?;
        add_bdev(&t, b)
    })?;
    reg(t, "bdev_null_delete", |t, p: NameParams| async move { delete(&t, &p.name, "null").await })?;

    reg(t, "bdev_uring_create", |t, p: BdevUringCreateParams| async move {
        let _g = t.ops.lock().await;
        exists_check(&t, &p.name)?;
        let (name, path, bs) = (p.name.clone(), p.filename.clone(), p.block_size);
        let b = t
            .on_reactor(move || async move { UringBdev::create(&name, Path::new(&path), bs) })
            .await?
            .map_err(|e| errno_err(e, format!("cannot create uring bdev {} over {}", p.name, p.filename.display())))?;
        add_bdev(&t, b)
    })?;
    reg(t, "bdev_uring_delete", |t, p: NameParams| async move { delete(&t, &p.name, "uring").await })?;

    reg(t, "bdev_error_create", |t, p: BdevErrorCreateParams| async move {
        let _g = t.ops.lock().await;
        let name = format!("EE_{}", p.base_name);
        exists_check(&t, &name)?;
        let base = claim(&t, &p.base_name, &name)?;
        let uuid = p.uuid.unwrap_or_else(uuid::Uuid::new_v4);
        let r = t.on_reactor(move || async move { ErrorBdev::create_with_uuid(base, None, uuid) }).await;
        let b = match r {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                t.bdevs.release(&p.base_name, &name);
                return Err(create_err(e, &name, "error"));
            }
            Err(e) => {
                t.bdevs.release(&p.base_name, &name);
                return Err(e);
            }
        };
        add_bdev(&t, b).inspect_err(|_| t.bdevs.release(&p.base_name, &name))
    })?;
    reg(t, "bdev_error_delete", |t, p: NameParams| async move { delete(&t, &p.name, "error").await })?;
    reg_pre(t, "bdev_error_inject_error", clear_takes_no_error_type, |t, p: BdevErrorInjectErrorParams| async move {
        inject(&t, p)
    })?;

    reg(t, "bdev_delay_create", |t, p: BdevDelayCreateParams| async move {
        let _g = t.ops.lock().await;
        exists_check(&t, &p.name)?;
        let base = claim(&t, &p.base_bdev_name, &p.name)?;
        let lat = DelayLatencies {
            avg_read_us: p.avg_read_latency,
            p99_read_us: p.p99_read_latency,
            avg_write_us: p.avg_write_latency,
            p99_write_us: p.p99_write_latency,
        };
        let uuid = p.uuid.unwrap_or_else(uuid::Uuid::new_v4);
        let seed = name_seed(&p.name);
        let name = p.name.clone();
        let r = t.on_reactor(move || async move { DelayBdev::create_with_uuid(base, &name, lat, seed, uuid) }).await;
        let b = match r {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                t.bdevs.release(&p.base_bdev_name, &p.name);
                return Err(create_err(e, &p.name, "delay"));
            }
            Err(e) => {
                t.bdevs.release(&p.base_bdev_name, &p.name);
                return Err(e);
            }
        };
        add_bdev(&t, b).inspect_err(|_| t.bdevs.release(&p.base_bdev_name, &p.name))
    })?;
    reg(t, "bdev_delay_delete", |t, p: NameParams| async move { delete(&t, &p.name, "delay").await })?;
    reg(t, "bdev_delay_update_latency", |t, p: BdevDelayUpdateLatencyParams| async move {
        let desc = t.open(&p.delay_bdev_name)?;
        let Some(d) = desc.bdev().as_any().downcast_ref::<DelayBdev>() else {
            return Err(RpcError::no_device(format!("bdev {} is not a delay bdev", p.delay_bdev_name)));
        };
        let kind = match p.latency_type {
            DelayLatencyType::AvgRead => LatencyKind::AvgRead,
            DelayLatencyType::AvgWrite => LatencyKind::AvgWrite,
            DelayLatencyType::P99Read => LatencyKind::P99Read,
            DelayLatencyType::P99Write => LatencyKind::P99Write,
        };
        d.update_latency(kind, p.latency_us).map_err(|e| {
            errno_err(e, format!("cannot set {} of {} to {} us", p.latency_type, p.delay_bdev_name, p.latency_us))
        })?;
        Ok(true)
    })?;
    Ok(())
}

/// rpc.py's `bdev_error_inject_error NAME clear TYPE` always sends an `error_type` (a
/// required positional argument there); the schema refuses one with `io_type: "clear"`.
/// It means nothing for a clear, so it is dropped.
fn clear_takes_no_error_type(o: &mut Map<String, Value>) -> Result<(), RpcError> {
    if o.get("io_type").and_then(Value::as_str) == Some("clear") {
        o.remove("error_type");
    }
    Ok(())
}

/// A deterministic per-name seed for the delay model (no unseeded randomness).
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn next_malloc_name(t: &Target) -> String {
    loop {
        let n = t.malloc_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("Malloc{n}");
        if t.bdevs.get(&name).is_none() {
            return name;
        }
    }
}

fn exists_check(t: &Target, name: &str) -> Result<(), RpcError> {
    if t.bdevs.get(name).is_some() {
        return Err(RpcError::exists(format!("bdev {name} already exists")));
    }
    Ok(())
}

fn create_err(e: Errno, name: &str, kind: &str) -> RpcError {
    match e {
        Errno::EEXIST => RpcError::exists(format!("bdev {name} already exists")),
        e => errno_err(e, format!("cannot create {kind} bdev {name}")),
    }
}

/// Adds a new bdev to the registry; its name is the result (as in SPDK).
fn add_bdev(t: &Target, b: Arc<dyn Bdev>) -> Result<String, RpcError> {
    let name = b.info().name.clone();
    t.bdevs.register(b).map_err(|e| create_err(e, &name, "the"))?;
    log::info!("bdev {name} created");
    Ok(name)
}

/// Claims `base` for `by`: ENODEV if absent, EBUSY naming the current owner.
pub fn claim(t: &Target, base: &str, by: &str) -> Result<BdevDesc, RpcError> {
    t.bdevs.claim(base, by).map_err(|e| match e {
        Errno::ENODEV => RpcError::no_device(format!("bdev {base} not found")),
        Errno::EBUSY => RpcError::busy(format!(
            "bdev {base} is already claimed by {}",
            t.bdevs.claimed_by(base).unwrap_or_else(|| "another bdev".into())
        )),
        e => errno_err(e, format!("cannot claim bdev {base}")),
    })
}

/// Deletes bdev `name` of driver `driver`, releasing what it claimed.
async fn delete(t: &Arc<Target>, name: &str, driver: &str) -> Result<bool, RpcError> {
    let _g = t.ops.lock().await;
    let desc = t.open(name)?;
    if desc.bdev().driver() != driver {
        return Err(RpcError::no_device(format!(
            "bdev {name} is not a {driver} bdev (driver {})",
            desc.bdev().driver()
        )));
    }
    t.check_deletable(name)?;
    let desc = t.unregister(name).await?;
    for base in desc.bdev().base_bdevs() {
        t.bdevs.release(&base, name);
    }
    log::info!("bdev {name} deleted");
    Ok(true)
}

async fn get_bdevs(t: &Arc<Target>, p: BdevGetBdevsParams) -> Result<Vec<Value>, RpcError> {
    let list: Vec<Arc<dyn Bdev>> = match &p.name {
        Some(name) => {
            let deadline = Instant::now() + Duration::from_millis(p.timeout.unwrap_or(0).min(3_600_000));
            loop {
                if let Some(b) = t.bdevs.get(name) {
                    break vec![b];
                }
                if Instant::now() >= deadline {
                    return Err(RpcError::no_device(format!("bdev {name} not found")));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        None => t.bdevs.list(),
    };
    Ok(list.iter().map(|b| bdev_json(t, b.as_ref())).collect())
}

fn bdev_json(t: &Target, b: &dyn Bdev) -> Value {
    let i = b.info();
    let claimed_by = t.bdevs.claimed_by(&i.name);
    let io = |x: IoType| i.io_types.contains(x);
    let mut driver_specific = b.driver_specific();
    if !driver_specific.is_object() {
        driver_specific = json!({});
    }
    let mut v = json!({
        "name": i.name,
        "aliases": [],
        "product_name": i.product_name,
        "block_size": i.block_size,
        "num_blocks": i.num_blocks,
        "uuid": i.uuid.to_string(),
        "assigned_rate_limits": {
            "rw_ios_per_sec": 0,
            "rw_mbytes_per_sec": 0,
            "r_mbytes_per_sec": 0,
            "w_mbytes_per_sec": 0
        },
        "claimed": claimed_by.is_some(),
        "zoned": false,
        "write_cache": i.volatile_cache,
        "supported_io_types": {
            "read": io(IoType::Read),
            "write": io(IoType::Write),
            "unmap": io(IoType::Unmap),
            "flush": io(IoType::Flush),
            "reset": false,
            "nvme_admin": false,
            "nvme_io": false,
            "write_zeroes": io(IoType::WriteZeroes),
            "compare": false,
            "compare_and_write": false,
            "abort": false,
            "seek_hole": false,
            "seek_data": false,
            "copy": false,
            "nvme_iov_md": false
        },
        "driver_specific": driver_specific,
    });
    if let Some(by) = claimed_by {
        v["claim_type"] = json!("exclusive_write");
        v["claimed_by"] = json!(by);
    }
    v
}

/// `bdev_get_iostat` params: the schema's plus what rpc.py always sends.
#[derive(Debug, Default)]
pub struct IostatArgs {
    name: Option<String>,
    names: Option<Vec<String>>,
}

impl<'de> serde::Deserialize<'de> for IostatArgs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut o = Map::<String, Value>::deserialize(d)?;
        let names = match o.remove("names") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value::<Vec<String>>(v).map_err(serde::de::Error::custom)?),
        };
        let p: BdevGetIostatParams = serde_json::from_value(Value::Object(o)).map_err(serde::de::Error::custom)?;
        Ok(IostatArgs { name: p.name, names })
    }
}

impl tiercache_jsonrpc::Validate for IostatArgs {
    fn validate(&self) -> Result<(), tiercache_jsonrpc::ParamError> {
        tiercache_jsonrpc::Validate::validate(&BdevGetIostatParams { name: self.name.clone() })
    }
}

/// rpc.py sends `per_channel` (false by default) and `reset_mode`; `names` is read by
/// [`IostatArgs`].
fn iostat_spdk_extras(o: &mut Map<String, Value>) -> Result<(), RpcError> {
    match o.remove("per_channel") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => return Err(not_supported("bdev_get_iostat per_channel")),
        Some(_) => return Err(RpcError::invalid_params("per_channel: must be a boolean")),
    }
    match o.remove("reset_mode") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(Value::String(s)) => return Err(not_supported(format!("bdev_get_iostat reset_mode \"{s}\""))),
        Some(_) => return Err(RpcError::invalid_params("reset_mode: must be a string")),
    }
    Ok(())
}

/// Nanoseconds since the daemon started (the `ticks` of `bdev_get_iostat`).
pub fn ticks(t: &Target) -> u64 {
    t.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
}

async fn get_iostat(t: &Arc<Target>, p: IostatArgs) -> Result<Value, RpcError> {
    let mut wanted: Vec<String> = Vec::new();
    wanted.extend(p.name.iter().cloned());
    wanted.extend(p.names.iter().flatten().cloned());
    let list: Vec<Arc<dyn Bdev>> = if wanted.is_empty() {
        t.bdevs.list()
    } else {
        wanted
            .iter()
            .map(|n| t.bdevs.get(n).ok_or_else(|| RpcError::no_device(format!("bdev {n} not found"))))
            .collect::<Result<_, _>>()?
    };
    let mut out = Vec::with_capacity(list.len());
    for b in list {
        let name = b.info().name.clone();
        let Ok(desc) = t.bdevs.open(&name) else { continue };
        let s = desc.iostat(&t.reactors).await;
        out.push(iostat_json(&name, &s));
    }
    Ok(json!({ "tick_rate": TICK_RATE, "ticks": ticks(t), "bdevs": out }))
}

/// SPDK's per-bdev iostat fields (latency fields are not measured, so not reported), plus
/// tiercache's write-zeroes, flush, retry and rejection counters.
pub fn iostat_json(name: &str, s: &IoStats) -> Value {
    json!({
        "name": name,
        "bytes_read": s.bytes_read,
        "num_read_ops": s.num_read_ops,
        "bytes_written": s.bytes_written,
        "num_write_ops": s.num_write_ops,
        "bytes_unmapped": s.bytes_unmapped,
        "num_unmap_ops": s.num_unmap_ops,
        "bytes_copied": 0,
        "num_copy_ops": 0,
        "bytes_write_zeroes": s.bytes_write_zeroes,
        "num_write_zeroes_ops": s.num_write_zeroes_ops,
        "num_flush_ops": s.num_flush_ops,
        "io_error": { "total": s.num_errors },
        "num_retries": s.num_retries,
        "num_rejected": s.num_rejected,
    })
}

fn inject(t: &Arc<Target>, p: BdevErrorInjectErrorParams) -> Result<bool, RpcError> {
    let desc = t.open(&p.name)?;
    let Some(eb) = desc.bdev().as_any().downcast_ref::<ErrorBdev>() else {
        return Err(RpcError::no_device(format!("bdev {} is not an error bdev", p.name)));
    };
    if p.is_clear() {
        eb.clear();
        return Ok(true);
    }
    if let Some(off) = p.offline {
        eb.set_offline(off);
        return Ok(true);
    }
    let io = match p.io_type {
        Some(ErrorIoType::Read) => Some(IoType::Read),
        Some(ErrorIoType::Write) => Some(IoType::Write),
        Some(ErrorIoType::Flush) => Some(IoType::Flush),
        Some(ErrorIoType::Unmap) => Some(IoType::Unmap),
        Some(ErrorIoType::WriteZeroes) => Some(IoType::WriteZeroes),
        Some(ErrorIoType::All) | Some(ErrorIoType::Clear) | None => None,
    };
    let kind = match p.error_type {
        Some(ErrorType::Failure) | None => ErrorKind::Failure,
        Some(ErrorType::Nomem) => ErrorKind::NoMem,
        Some(ErrorType::CorruptData) => {
            // The error bdev flips the first byte of every block with 0xff.
            if p.corrupt_offset.unwrap_or(0) != 0 || p.corrupt_value != Some(0xff) {
                return Err(not_supported(
                    "corrupt_data with corrupt_offset != 0 or corrupt_value != 255 (the error bdev XORs byte 0 of each block with 0xff)",
                ));
            }
            ErrorKind::CorruptData
        }
        Some(ErrorType::Pending) => return Err(not_supported("error_type \"pending\" (I/Os that never complete)")),
    };
    let trigger = match (p.num, p.every_nth, p.probability) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(RpcError::invalid_argument("num cannot be combined with every_nth or probability"))
        }
        (_, Some(n), _) => Trigger::EveryNth(u64::from(n)),
        (_, _, Some(prob)) => Trigger::Probability { p: prob, seed: p.seed.unwrap_or(0) },
        (Some(1) | None, None, None) => Trigger::Once,
        (Some(n), None, None) => Trigger::Times(u64::from(n)),
    };
    eb.inject(ErrorSpec::new(io, kind, trigger))
        .map_err(|e| errno_err(e, format!("cannot inject {:?} on {}", p.error_type, p.name)))?;
    Ok(true)
}
