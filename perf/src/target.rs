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
    };
    let echo = echo(bdev.as_ref(), kind, path);
    Ok((bdev, echo))
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
