//! Creating the bdev under test.

use std::sync::Arc;

use tiercache_bdevs::malloc::MallocBdev;
use tiercache_bdevs::null::NullBdev;
use tiercache_bdevs::uring::UringBdev;
use tiercache_engine::bdev::Bdev;

use crate::config::TargetSpec;
use crate::report::TargetEcho;

/// Create the target bdev; errors name the target and the errno.
pub fn create(spec: &TargetSpec) -> Result<(Arc<dyn Bdev>, TargetEcho), String> {
    let (bdev, kind, path): (Arc<dyn Bdev>, &str, Option<String>) = match spec {
        TargetSpec::Null { size, block_size } => {
            let b = NullBdev::create("perf-null0", size / *block_size as u64, *block_size)
                .map_err(|e| format!("cannot create a null bdev of {size} bytes with {block_size}-byte blocks: {e}"))?;
            (b, "null", None)
        }
        TargetSpec::Malloc { size, block_size } => {
            let b = MallocBdev::create("perf-malloc0", size / *block_size as u64, *block_size).map_err(|e| {
                format!("cannot create a malloc bdev of {size} bytes with {block_size}-byte blocks: {e}")
            })?;
            (b, "malloc", None)
        }
        TargetSpec::Uring { path, block_size } => {
            let b = UringBdev::create("perf-uring0", path, *block_size)
                .map_err(|e| format!("cannot open {} as a uring bdev: {e}", path.display()))?;
            (b, "uring", Some(path.display().to_string()))
        }
        TargetSpec::Cached(_) => {
            return Err("internal: a cached target is opened on the reactors (crate::cached)".into());
        }
        TargetSpec::Config { path, bdev } => {
            let b = from_config(path, bdev.as_deref())?;
            (b, "config", Some(path.display().to_string()))
        }
    };
    let echo = echo(bdev.as_ref(), kind, path);
    Ok((bdev, echo))
}

/// Build the bdevs of a JSON config (the `bdev` subsystem, in order) and return the one
/// named `want` (default: the last). Errors name the entry.
fn from_config(path: &std::path::Path, want: Option<&str>) -> Result<Arc<dyn Bdev>, String> {
    use serde_json::Value;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let subsystems = doc.get("subsystems").and_then(Value::as_array).ok_or("config: no \"subsystems\" array")?;
    let mut made: Vec<(String, Arc<dyn Bdev>)> = Vec::new();
    let find = |made: &[(String, Arc<dyn Bdev>)], n: &str| made.iter().find(|(m, _)| m == n).map(|(_, b)| b.clone());
    for sub in subsystems.iter().filter(|s| s.get("subsystem").and_then(Value::as_str) == Some("bdev")) {
        let entries = sub.get("config").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        for (i, e) in entries.iter().enumerate() {
            let method = e.get("method").and_then(Value::as_str).unwrap_or("");
            let p = e.get("params").cloned().unwrap_or(Value::Null);
            let s = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_string);
            let n = |k: &str| p.get(k).and_then(Value::as_u64);
            let at = |what: String| format!("config bdev entry #{i} ({method}): {what}");
            let need_s = |k: &str| s(k).ok_or_else(|| at(format!("missing \"{k}\"")));
            let need_n = |k: &str| n(k).ok_or_else(|| at(format!("missing \"{k}\"")));
            let base = |k: &str| -> Result<Arc<dyn Bdev>, String> {
                let name = need_s(k)?;
                find(&made, &name).ok_or_else(|| at(format!("unknown base bdev {name:?}")))
            };
            let b: Arc<dyn Bdev> = match method {
                "bdev_malloc_create" => {
                    let bs = n("block_size").unwrap_or(4096) as u32;
                    MallocBdev::create(&need_s("name")?, need_n("num_blocks")?, bs).map_err(|e| at(e.to_string()))?
                }
                "bdev_null_create" => {
                    let bs = n("block_size").unwrap_or(4096) as u32;
                    NullBdev::create(&need_s("name")?, need_n("num_blocks")?, bs).map_err(|e| at(e.to_string()))?
                }
                "bdev_uring_create" => {
                    let file = std::path::PathBuf::from(need_s("filename")?);
                    UringBdev::create(&need_s("name")?, &file, n("block_size").map(|b| b as u32))
                        .map_err(|e| at(e.to_string()))?
                }
                "bdev_delay_create" => {
                    let lat = tiercache_bdevs::delay::DelayLatencies {
                        avg_read_us: n("avg_read_latency").unwrap_or(0),
                        p99_read_us: n("p99_read_latency").unwrap_or(0),
                        avg_write_us: n("avg_write_latency").unwrap_or(0),
                        p99_write_us: n("p99_write_latency").unwrap_or(0),
                    };
                    let desc = tiercache_engine::bdev::BdevDesc::new(base("base_bdev_name")?);
                    tiercache_bdevs::delay::DelayBdev::create(desc, &need_s("name")?, lat, 1)
                        .map_err(|e| at(e.to_string()))?
                }
                "bdev_error_create" => {
                    let desc = tiercache_engine::bdev::BdevDesc::new(base("base_name")?);
                    tiercache_bdevs::error::ErrorBdev::create(desc, s("name").as_deref())
                        .map_err(|e| at(e.to_string()))?
                }
                other => {
                    return Err(at(format!(
                        "{other} is not supported by tiercache-perf --config (use --cache for cached bdevs)"
                    )))
                }
            };
            made.push((b.info().name.clone(), b));
        }
    }
    match want {
        Some(w) => find(&made, w).ok_or_else(|| format!("config creates no bdev named {w:?}")),
        None => made.last().map(|(_, b)| b.clone()).ok_or_else(|| "config creates no bdev".to_string()),
    }
}

/// How the report names a target.
pub fn echo(bdev: &dyn Bdev, kind: &str, path: Option<String>) -> TargetEcho {
    let info = bdev.info();
    TargetEcho {
        kind: kind.into(),
        name: info.name.clone(),
        path,
        block_size: info.block_size,
        num_blocks: info.num_blocks,
        size_bytes: info.size_bytes(),
    }
}
