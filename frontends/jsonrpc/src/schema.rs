//! Parameter types of every tiercache RPC method.
//!
//! One set of types serves both RPC params and config-file entries (a config
//! entry is `{"method": ..., "params": ...}` with the same params). Names
//! follow SPDK wherever SPDK has the same method. Every struct denies unknown
//! fields; [`decode_params`] decodes and validates, naming the offending
//! field in the error.

use crate::protocol::ParamError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::PathBuf;
use uuid::Uuid;

/// Light semantic validation run after decoding.
pub trait Validate {
    /// Checks values that the types alone cannot express.
    fn validate(&self) -> Result<(), ParamError> {
        Ok(())
    }
}

/// Raw params (a handler that decodes them itself): any object, absent or
/// `null` (seen as `{}`).
impl Validate for Value {}

/// Decodes `params` (absent / `null` = `{}`) into `P` and validates it.
///
/// Errors name the field: `unknown field "nmae", expected one of ...`,
/// `missing field "num_blocks"`, `num_blocks: invalid type: ...`,
/// `num_blocks: must be > 0`.
pub fn decode_params<P: DeserializeOwned + Validate>(params: Option<Value>) -> Result<P, ParamError> {
    let obj = match params {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(ParamError::NotAnObject),
    };
    let p = decode_object::<P>(obj)?;
    p.validate()?;
    Ok(p)
}

fn serde_msg(e: &serde_json::Error) -> String {
    e.to_string().replace('`', "\"")
}

fn decode_object<P: DeserializeOwned>(obj: Map<String, Value>) -> Result<P, ParamError> {
    let err = match serde_json::from_value::<P>(Value::Object(obj.clone())) {
        Ok(p) => return Ok(p),
        Err(e) => e,
    };
    let msg = serde_msg(&err);
    if let Some(rest) = msg.strip_prefix("missing field \"") {
        return Err(ParamError::Missing(rest.trim_end_matches('"').to_string()));
    }
    if msg.starts_with("unknown field") {
        return Err(ParamError::Decode(msg));
    }
    // serde_json does not say which field had a bad value. Fields are
    // decoded in input order and the first failure aborts, so the culprit is
    // the one key whose removal changes the error. Bounded so a huge object
    // cannot make the error path quadratic.
    if obj.len() <= 64 {
        for key in obj.keys() {
            let mut probe = obj.clone();
            probe.remove(key);
            let changed = match serde_json::from_value::<P>(Value::Object(probe)) {
                Ok(_) => true,
                Err(e2) => serde_msg(&e2) != msg,
            };
            if changed {
                return Err(ParamError::Invalid { field: key.clone(), reason: msg });
            }
        }
    }
    Err(ParamError::Decode(msg))
}

// ---------------------------------------------------------------- helpers

fn check_name(field: &str, name: &str) -> Result<(), ParamError> {
    if name.is_empty() {
        return Err(ParamError::invalid(field, "must not be empty"));
    }
    if name.len() > 255 {
        return Err(ParamError::invalid(field, "must be at most 255 bytes"));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ParamError::invalid(field, "must not contain whitespace or control characters"));
    }
    Ok(())
}

fn check_opt_name(field: &str, name: &Option<String>) -> Result<(), ParamError> {
    name.as_deref().map_or(Ok(()), |n| check_name(field, n))
}

fn check_block_size(field: &str, bs: u32) -> Result<(), ParamError> {
    if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
        return Err(ParamError::invalid(field, "must be a power of two between 512 and 65536"));
    }
    Ok(())
}

fn check_positive(field: &str, v: u64) -> Result<(), ParamError> {
    if v == 0 {
        return Err(ParamError::invalid(field, "must be > 0"));
    }
    Ok(())
}

/// SPDK's metadata / DIF knobs: accepted at their "none" values only.
fn check_spdk_metadata(
    block_size: u32,
    physical_block_size: Option<u32>,
    md_size: Option<u32>,
    dif_type: Option<u32>,
    dif_pi_format: Option<u32>,
) -> Result<(), ParamError> {
    if let Some(pbs) = physical_block_size {
        check_block_size("physical_block_size", pbs)?;
        if pbs < block_size {
            return Err(ParamError::invalid("physical_block_size", "must be >= block_size"));
        }
    }
    for (field, v) in [("md_size", md_size), ("dif_type", dif_type), ("dif_pi_format", dif_pi_format)] {
        if v.unwrap_or(0) != 0 {
            return Err(ParamError::invalid(field, "metadata / protection information is not supported (must be 0)"));
        }
    }
    Ok(())
}

fn is_false(b: &bool) -> bool {
    !*b
}

macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal $(| $alias:literal)*),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s $(, alias = $alias)*)] $var,)*
        }
        impl $name {
            /// The wire spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s,)* }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

// ------------------------------------------------------------ framework

/// Params of a method that takes none (`tiercache_get_version`,
/// `framework_get_reactors`, `framework_get_subsystems`, `nbd_server_stop`).
/// SPDK: `framework_get_reactors`, `framework_get_subsystems` take none too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}
impl Validate for NoParams {}

/// `rpc_get_methods`; SPDK: same name and params. tiercache has a single
/// (runtime) RPC state and no deprecated aliases, so both flags are accepted
/// for compatibility and the full list is always returned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcGetMethodsParams {
    /// SPDK: only methods allowed in the current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<bool>,
    /// SPDK: include deprecated aliases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_aliases: Option<bool>,
}
impl Validate for RpcGetMethodsParams {}

/// `framework_get_config`; SPDK: same name, param `name` (subsystem).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameworkGetConfigParams {
    /// Subsystem name (`bdev`, `nbd`).
    pub name: String,
}
impl Validate for FrameworkGetConfigParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("name", &self.name)
    }
}

/// `save_config`; SPDK's `save_config` is assembled client-side by rpc.py
/// from `framework_get_subsystems` + `framework_get_config`; tiercache
/// serves it as one method returning the whole document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveConfigParams {
    /// Only these subsystems (rpc.py's `--subsystems` filter); all if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsystems: Option<Vec<String>>,
}
impl Validate for SaveConfigParams {}

// ------------------------------------------------------------------ bdev

/// Params naming one object: `bdev_malloc_delete`, `bdev_null_delete`,
/// `bdev_uring_delete`, `bdev_error_delete`, `bdev_delay_delete` (SPDK: same
/// names, param `name`) and the `bdev_cache_*` methods modelled on SPDK's
/// `bdev_ocf_delete` / `bdev_ocf_get_stats` / `bdev_ocf_reset_stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    /// Bdev name.
    pub name: String,
}
impl Validate for NameParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("name", &self.name)
    }
}

/// `bdev_get_bdevs`; SPDK: same name and params.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevGetBdevsParams {
    /// Only this bdev (error `-ENODEV` if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Milliseconds to wait for `name` to appear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}
impl Validate for BdevGetBdevsParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_opt_name("name", &self.name)?;
        if self.timeout.is_some() && self.name.is_none() {
            return Err(ParamError::Conflict("timeout requires name".into()));
        }
        Ok(())
    }
}

/// `bdev_get_iostat`; SPDK: same name, param `name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevGetIostatParams {
    /// Only this bdev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}
impl Validate for BdevGetIostatParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_opt_name("name", &self.name)
    }
}

/// `bdev_malloc_create`; SPDK: same name and params (a subset: no
/// metadata / DIF options). Returns the bdev name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevMallocCreateParams {
    /// Bdev name; generated (`MallocN`) when absent, as in SPDK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Bdev UUID; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    /// SPDK: physical block size (power of two, >= `block_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_block_size: Option<u32>,
    /// SPDK: metadata size; tiercache has no metadata, only 0 is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md_size: Option<u32>,
    /// SPDK: protection information type; only 0 (none) is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dif_type: Option<u32>,
    /// SPDK: PI at head of metadata; meaningless without metadata (rpc.py
    /// always sends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dif_is_head_of_md: Option<bool>,
    /// SPDK: PI format; only 0 is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dif_pi_format: Option<u32>,
    /// SPDK: metadata interleaved; meaningless without metadata (rpc.py
    /// always sends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md_interleave: Option<bool>,
    /// SPDK: split I/O on this boundary, in blocks (0 = off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimal_io_boundary: Option<u32>,
    /// SPDK: NUMA node for the memory (-1 = any); a placement hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_id: Option<i32>,
}
impl Validate for BdevMallocCreateParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_opt_name("name", &self.name)?;
        check_positive("num_blocks", self.num_blocks)?;
        check_block_size("block_size", self.block_size)?;
        if self.num_blocks.checked_mul(u64::from(self.block_size)).is_none() {
            return Err(ParamError::invalid("num_blocks", "size overflows 64 bits"));
        }
        check_spdk_metadata(self.block_size, self.physical_block_size, self.md_size, self.dif_type, self.dif_pi_format)
    }
}

/// `bdev_null_create`; SPDK: same name and params (name required).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevNullCreateParams {
    /// Bdev name.
    pub name: String,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Bdev UUID; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    /// SPDK: physical block size (power of two, >= `block_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_block_size: Option<u32>,
    /// SPDK: metadata size; tiercache has no metadata, only 0 is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md_size: Option<u32>,
    /// SPDK: protection information type; only 0 (none) is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dif_type: Option<u32>,
    /// SPDK: PI at head of metadata; meaningless without metadata (rpc.py
    /// always sends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dif_is_head_of_md: Option<bool>,
    /// SPDK: PI format; only 0 is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dif_pi_format: Option<u32>,
}
impl Validate for BdevNullCreateParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("name", &self.name)?;
        check_positive("num_blocks", self.num_blocks)?;
        check_block_size("block_size", self.block_size)?;
        if self.num_blocks.checked_mul(u64::from(self.block_size)).is_none() {
            return Err(ParamError::invalid("num_blocks", "size overflows 64 bits"));
        }
        check_spdk_metadata(self.block_size, self.physical_block_size, self.md_size, self.dif_type, self.dif_pi_format)
    }
}

/// `bdev_uring_create`; SPDK: same name and params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevUringCreateParams {
    /// Path of the file or block device.
    pub filename: PathBuf,
    /// Bdev name.
    pub name: String,
    /// Block size; detected from the device when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
}
impl Validate for BdevUringCreateParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.filename.as_os_str().is_empty() {
            return Err(ParamError::invalid("filename", "must not be empty"));
        }
        check_name("name", &self.name)?;
        self.block_size.map_or(Ok(()), |bs| check_block_size("block_size", bs))
    }
}

/// `bdev_error_create`; SPDK: same name and params. Creates `EE_<base_name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevErrorCreateParams {
    /// Base bdev.
    pub base_name: String,
    /// UUID of the error bdev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
}
impl Validate for BdevErrorCreateParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("base_name", &self.base_name)
    }
}

str_enum! {
    /// `io_type` of `bdev_error_inject_error` (SPDK spellings).
    ErrorIoType {
        /// Reads.
        Read = "read",
        /// Writes.
        Write = "write",
        /// Flushes.
        Flush = "flush",
        /// Unmaps.
        Unmap = "unmap",
        /// Write-zeroes.
        WriteZeroes = "write_zeroes",
        /// Every I/O type.
        All = "all",
        /// SPDK spelling of "remove every injected error" (same as `clear: true`).
        Clear = "clear",
    }
}

str_enum! {
    /// `error_type` of `bdev_error_inject_error` (SPDK spellings).
    ErrorType {
        /// Complete with an I/O error.
        Failure = "failure",
        /// Never complete (until cleared).
        Pending = "pending",
        /// Flip data (`corrupt_offset` / `corrupt_value`).
        CorruptData = "corrupt_data",
        /// Complete with `-ENOMEM` (retry path).
        Nomem = "nomem",
    }
}

/// `bdev_error_inject_error`; SPDK: same name and params (`name`, `io_type`,
/// `error_type`, `num`, `corrupt_offset`, `corrupt_value`) plus tiercache
/// extensions: `every_nth`, `probability` + `seed`, `offline`, `clear`.
///
/// `io_type` / `error_type` are required except for `clear` (drop every
/// rule on the bdev) and `offline` (take the bdev offline / back online).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevErrorInjectErrorParams {
    /// Error bdev name (`EE_...`).
    pub name: String,
    /// Which I/O type to hit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_type: Option<ErrorIoType>,
    /// What to do to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<ErrorType>,
    /// How many I/Os to hit (SPDK default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num: Option<u32>,
    /// SPDK: byte offset to corrupt (corrupt_data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrupt_offset: Option<u64>,
    /// SPDK: XOR value for the corrupted byte (corrupt_data, non-zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrupt_value: Option<u8>,
    /// tiercache: hit every n-th matching I/O instead of the next ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_nth: Option<u32>,
    /// tiercache: hit each matching I/O with this probability (0..=1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    /// tiercache: seed of the probability draw (reproducible runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// tiercache: `true` takes the bdev offline (all I/O fails), `false`
    /// brings it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<bool>,
    /// tiercache: remove every injected rule on the bdev.
    #[serde(default, skip_serializing_if = "is_false")]
    pub clear: bool,
}
impl BdevErrorInjectErrorParams {
    /// True when this call clears rules (`clear: true` or `io_type: "clear"`).
    pub fn is_clear(&self) -> bool {
        self.clear || self.io_type == Some(ErrorIoType::Clear)
    }
}
impl Validate for BdevErrorInjectErrorParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("name", &self.name)?;
        if self.is_clear() || self.offline.is_some() {
            if self.error_type.is_some() && self.is_clear() {
                return Err(ParamError::Conflict("clear does not take error_type".into()));
            }
            if self.is_clear() && self.offline.is_some() {
                return Err(ParamError::Conflict("clear and offline are exclusive".into()));
            }
            if self.offline.is_some() && (self.io_type.is_some() || self.error_type.is_some()) {
                return Err(ParamError::Conflict("offline does not take io_type or error_type".into()));
            }
            return Ok(());
        }
        if self.io_type.is_none() {
            return Err(ParamError::Missing("io_type".into()));
        }
        let Some(et) = self.error_type else {
            return Err(ParamError::Missing("error_type".into()));
        };
        if self.num == Some(0) {
            return Err(ParamError::invalid("num", "must be > 0"));
        }
        if self.every_nth == Some(0) {
            return Err(ParamError::invalid("every_nth", "must be > 0"));
        }
        if let Some(p) = self.probability {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ParamError::invalid("probability", "must be in (0, 1]"));
            }
            if self.every_nth.is_some() {
                return Err(ParamError::Conflict("every_nth and probability are exclusive".into()));
            }
        } else if self.seed.is_some() {
            return Err(ParamError::Conflict("seed requires probability".into()));
        }
        let corrupt = self.corrupt_offset.is_some() || self.corrupt_value.is_some();
        if et == ErrorType::CorruptData {
            if self.corrupt_value.unwrap_or(0) == 0 {
                return Err(ParamError::invalid("corrupt_value", "must be non-zero for corrupt_data"));
            }
        } else if corrupt {
            return Err(ParamError::Conflict("corrupt_offset / corrupt_value need error_type corrupt_data".into()));
        }
        Ok(())
    }
}

/// `bdev_delay_create`; SPDK: same name and params (latencies in µs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevDelayCreateParams {
    /// Base bdev.
    pub base_bdev_name: String,
    /// Delay bdev name.
    pub name: String,
    /// Average read latency, µs.
    pub avg_read_latency: u64,
    /// 99th percentile read latency, µs.
    pub p99_read_latency: u64,
    /// Average write latency, µs.
    pub avg_write_latency: u64,
    /// 99th percentile write latency, µs.
    pub p99_write_latency: u64,
    /// UUID of the delay bdev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
}
impl Validate for BdevDelayCreateParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("base_bdev_name", &self.base_bdev_name)?;
        check_name("name", &self.name)?;
        if self.p99_read_latency < self.avg_read_latency {
            return Err(ParamError::invalid("p99_read_latency", "must be >= avg_read_latency"));
        }
        if self.p99_write_latency < self.avg_write_latency {
            return Err(ParamError::invalid("p99_write_latency", "must be >= avg_write_latency"));
        }
        Ok(())
    }
}

str_enum! {
    /// `latency_type` of `bdev_delay_update_latency` (SPDK spellings).
    DelayLatencyType {
        /// Average read.
        AvgRead = "avg_read",
        /// Average write.
        AvgWrite = "avg_write",
        /// p99 read.
        P99Read = "p99_read",
        /// p99 write.
        P99Write = "p99_write",
    }
}

/// `bdev_delay_update_latency`; SPDK: same name and params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevDelayUpdateLatencyParams {
    /// Delay bdev.
    pub delay_bdev_name: String,
    /// Which latency.
    pub latency_type: DelayLatencyType,
    /// New value, µs.
    pub latency_us: u64,
}
impl Validate for BdevDelayUpdateLatencyParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("delay_bdev_name", &self.delay_bdev_name)
    }
}

// ----------------------------------------------------------------- cache

str_enum! {
    /// Cache mode; SPDK OCF's short names (`wb`, `wt`, `wa`, `pt`) are
    /// accepted as aliases.
    CacheMode {
        /// Write-back.
        Writeback = "writeback" | "wb",
        /// Write-through.
        Writethrough = "writethrough" | "wt",
        /// Write-around (writes bypass, reads promote).
        Writearound = "writearound" | "wa",
        /// Pass-through (cache idle, dirty data still served).
        Passthrough = "passthrough" | "pt",
    }
}

/// `bdev_cache_create`; SPDK: `bdev_ocf_create` (`name`, `mode`,
/// `cache_bdev_name`, `core_bdev_name`) plus tiercache options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevCacheCreateParams {
    /// Name of the cached bdev.
    pub name: String,
    /// Cache mode.
    pub mode: CacheMode,
    /// Fast device.
    pub cache_bdev_name: String,
    /// Backing (slow) device.
    pub core_bdev_name: String,
    /// Log segment size, KiB (power of two, 64 KiB ..= 1 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_size_kib: Option<u32>,
    /// `true` formats the cache device; `false` (default) loads the
    /// existing cache and fails if it is not formatted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub format: bool,
    /// Block size exposed; defaults to the core bdev's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
}
impl Validate for BdevCacheCreateParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("name", &self.name)?;
        check_name("cache_bdev_name", &self.cache_bdev_name)?;
        check_name("core_bdev_name", &self.core_bdev_name)?;
        if self.cache_bdev_name == self.core_bdev_name {
            return Err(ParamError::invalid("core_bdev_name", "must differ from cache_bdev_name"));
        }
        if let Some(s) = self.segment_size_kib {
            if !(64..=1 << 20).contains(&s) || !s.is_power_of_two() {
                return Err(ParamError::invalid("segment_size_kib", "must be a power of two between 64 and 1048576"));
            }
        }
        self.block_size.map_or(Ok(()), |bs| check_block_size("block_size", bs))
    }
}

/// `bdev_cache_get_bdevs`; SPDK: `bdev_ocf_get_bdevs` (optional `name`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevCacheGetBdevsParams {
    /// Only this cache bdev (or the cache bdev built on this base bdev).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}
impl Validate for BdevCacheGetBdevsParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_opt_name("name", &self.name)
    }
}

/// `bdev_cache_set_cache_mode`; SPDK: `bdev_ocf_set_cache_mode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevCacheSetCacheModeParams {
    /// Cache bdev.
    pub name: String,
    /// New mode.
    pub mode: CacheMode,
}
impl Validate for BdevCacheSetCacheModeParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("name", &self.name)
    }
}

str_enum! {
    /// Sequential cut-off policy (SPDK OCF spellings).
    SeqCutoffPolicy {
        /// Always bypass sequential streams above the threshold.
        Always = "always",
        /// Bypass only when the cache is full.
        Full = "full",
        /// Never bypass.
        Never = "never",
    }
}

/// `bdev_cache_set_seqcutoff`; SPDK: `bdev_ocf_set_seqcutoff` (same params).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevCacheSetSeqcutoffParams {
    /// Cache bdev.
    pub name: String,
    /// Policy.
    pub policy: SeqCutoffPolicy,
    /// Stream size, KiB, above which I/O bypasses (1 ..= 4194181).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u32>,
    /// Sequential requests before a stream counts (1 ..= 65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion_count: Option<u32>,
}
impl Validate for BdevCacheSetSeqcutoffParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("name", &self.name)?;
        if let Some(t) = self.threshold {
            if !(1..=4_194_181).contains(&t) {
                return Err(ParamError::invalid("threshold", "must be in 1..=4194181 KiB"));
            }
        }
        if let Some(p) = self.promotion_count {
            if !(1..=65535).contains(&p) {
                return Err(ParamError::invalid("promotion_count", "must be in 1..=65535"));
            }
        }
        Ok(())
    }
}

str_enum! {
    /// What to do with the cached bdev when the cache device fails
    /// (bcache's `stop_when_cache_set_failed`).
    StopWhenCacheSetFailed {
        /// Stop only if dirty data would be lost.
        Auto = "auto",
        /// Always stop.
        Always = "always",
    }
}

/// `bdev_cache_set_options`; no SPDK equivalent (knobs modelled on bcache's
/// sysfs). At least one knob must be given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevCacheSetOptionsParams {
    /// Cache bdev.
    pub name: String,
    /// Dirty-data target, percent of the cache (0..=100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeback_percent: Option<u8>,
    /// Dirty percent of the cache at which writes of uncached blocks go around the cache
    /// to the backing device (1..=100; 100: only when the log has no room).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_write_cutoff_percent: Option<u8>,
    /// Minimum writeback rate, cache blocks per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeback_rate_min: Option<u64>,
    /// Maximum writeback rate, cache blocks per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeback_rate_max: Option<u64>,
    /// Decayed I/O error count that fails the cache device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_error_limit: Option<u32>,
    /// Half-life of the error count, in I/Os.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_error_halflife: Option<u32>,
    /// Policy on cache device failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_when_cache_set_failed: Option<StopWhenCacheSetFailed>,
    /// How long I/O waits for an offline backing device, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_offline_grace_ms: Option<u64>,
    /// Read hits before a block is promoted into the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_after_hits: Option<u32>,
    /// Idle time after which an open segment is sealed, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_idle_ms: Option<u64>,
}
impl Validate for BdevCacheSetOptionsParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("name", &self.name)?;
        let none = BdevCacheSetOptionsParams { name: self.name.clone(), ..Default::default() };
        if *self == none {
            return Err(ParamError::Conflict("at least one option must be given".into()));
        }
        if self.writeback_percent.is_some_and(|p| p > 100) {
            return Err(ParamError::invalid("writeback_percent", "must be in 0..=100"));
        }
        if self.dirty_write_cutoff_percent.is_some_and(|p| !(1..=100).contains(&p)) {
            return Err(ParamError::invalid("dirty_write_cutoff_percent", "must be in 1..=100"));
        }
        if let (Some(lo), Some(hi)) = (self.writeback_rate_min, self.writeback_rate_max) {
            if lo > hi {
                return Err(ParamError::invalid("writeback_rate_max", "must be >= writeback_rate_min"));
            }
        }
        if self.writeback_rate_max == Some(0) {
            return Err(ParamError::invalid("writeback_rate_max", "must be > 0"));
        }
        if self.io_error_halflife == Some(0) {
            return Err(ParamError::invalid("io_error_halflife", "must be > 0"));
        }
        Ok(())
    }
}

/// `bdev_cache_attach`: attach a cache device to a cached bdev running
/// without one (after `bdev_cache_detach` or a cache failure). No SPDK
/// equivalent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevCacheAttachParams {
    /// Cached bdev.
    pub name: String,
    /// Cache device to attach.
    pub cache_bdev_name: String,
    /// Format it first (default: load and check it belongs to this bdev).
    #[serde(default, skip_serializing_if = "is_false")]
    pub format: bool,
}
impl Validate for BdevCacheAttachParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("name", &self.name)?;
        check_name("cache_bdev_name", &self.cache_bdev_name)
    }
}

/// `bdev_cache_load`: bring up a cached bdev from a formatted cache device,
/// taking name, mode and core bdev from its superblock unless overridden.
/// SPDK OCF loads implicitly in `bdev_ocf_create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevCacheLoadParams {
    /// Formatted cache device.
    pub cache_bdev_name: String,
    /// Override the recorded name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Override the recorded core bdev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_bdev_name: Option<String>,
}
impl Validate for BdevCacheLoadParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("cache_bdev_name", &self.cache_bdev_name)?;
        check_opt_name("name", &self.name)?;
        check_opt_name("core_bdev_name", &self.core_bdev_name)
    }
}

/// Result contract of progress methods (`bdev_cache_flush_status`, and the
/// status of `bdev_cache_detach`), polled by
/// [`crate::client::Client::wait_until_done`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressStatus {
    /// True when the operation is over (successfully or not).
    pub done: bool,
    /// Completion, 0..=100, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Free-form state ("flushing", "idle"...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Set when the operation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

// ------------------------------------------------------------------- nbd

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `unix:/path`.
    Unix(PathBuf),
    /// `host:port` (`[v6addr]:port` for IPv6 literals).
    Tcp {
        /// Host name or address, brackets removed.
        host: String,
        /// TCP port.
        port: u16,
    },
}

impl ListenAddr {
    /// Parses `unix:/path` or `host:port`.
    pub fn parse(s: &str) -> Result<ListenAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix socket path is empty".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let (host, port) = s.rsplit_once(':').ok_or("expected \"unix:/path\" or \"host:port\"")?;
        let port: u16 = port.parse().map_err(|_| format!("bad port \"{port}\""))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() {
            return Err("host is empty".into());
        }
        if host.contains(':') && !s.starts_with('[') {
            return Err("IPv6 addresses must be written [addr]:port".into());
        }
        Ok(ListenAddr::Tcp { host: host.to_string(), port })
    }
}

/// `nbd_server_start`; no SPDK equivalent (SPDK's `nbd_start_disk` needs the
/// kernel nbd driver; tiercache serves the NBD protocol itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdServerStartParams {
    /// `unix:/path` or `host:port`.
    pub listen: String,
}
impl NbdServerStartParams {
    /// The parsed listen address.
    pub fn listen_addr(&self) -> Result<ListenAddr, ParamError> {
        ListenAddr::parse(&self.listen).map_err(|e| ParamError::invalid("listen", e))
    }
}
impl Validate for NbdServerStartParams {
    fn validate(&self) -> Result<(), ParamError> {
        self.listen_addr().map(|_| ())
    }
}

/// `nbd_export_add`; no SPDK equivalent (closest: `nbd_start_disk`'s
/// `bdev_name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdExportAddParams {
    /// Bdev to export.
    pub bdev_name: String,
    /// NBD export name; defaults to `bdev_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_name: Option<String>,
    /// Refuse writes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}
impl NbdExportAddParams {
    /// The export name actually used.
    pub fn effective_export_name(&self) -> &str {
        self.export_name.as_deref().unwrap_or(&self.bdev_name)
    }
}
impl Validate for NbdExportAddParams {
    fn validate(&self) -> Result<(), ParamError> {
        check_name("bdev_name", &self.bdev_name)?;
        if let Some(e) = &self.export_name {
            // NBD export names are at most 4096 bytes on the wire.
            if e.is_empty() || e.len() > 4096 {
                return Err(ParamError::invalid("export_name", "must be 1..=4096 bytes"));
            }
        }
        Ok(())
    }
}

/// `nbd_export_remove`; no SPDK equivalent (closest: `nbd_stop_disk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdExportRemoveParams {
    /// Export to remove.
    pub export_name: String,
}
impl Validate for NbdExportRemoveParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.export_name.is_empty() {
            return Err(ParamError::invalid("export_name", "must not be empty"));
        }
        Ok(())
    }
}

/// `nbd_get_exports`; no SPDK equivalent (closest: `nbd_get_disks`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdGetExportsParams {
    /// Only this export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_name: Option<String>,
}
impl Validate for NbdGetExportsParams {}

// ----------------------------------------------------------- method table

macro_rules! method_table {
    ($($(#[$m:meta])* $name:literal => $ty:ty),* $(,)?) => {
        /// Every method tiercache defines, with its params type.
        pub const METHODS: &[(&str, &str)] = &[$(($name, stringify!($ty))),*];

        /// Decodes and validates `params` for a known method; `None` if the
        /// schema does not know the method.
        pub fn check_params(method: &str, params: Option<&Value>) -> Option<Result<(), ParamError>> {
            match method {
                $($name => Some(decode_params::<$ty>(params.cloned()).map(|_| ())),)*
                _ => None,
            }
        }
    };
}

method_table! {
    "rpc_get_methods" => RpcGetMethodsParams,
    "tiercache_get_version" => NoParams,
    "framework_get_reactors" => NoParams,
    "framework_get_subsystems" => NoParams,
    "framework_get_config" => FrameworkGetConfigParams,
    "save_config" => SaveConfigParams,
    "bdev_get_bdevs" => BdevGetBdevsParams,
    "bdev_get_iostat" => BdevGetIostatParams,
    "bdev_malloc_create" => BdevMallocCreateParams,
    "bdev_malloc_delete" => NameParams,
    "bdev_null_create" => BdevNullCreateParams,
    "bdev_null_delete" => NameParams,
    "bdev_uring_create" => BdevUringCreateParams,
    "bdev_uring_delete" => NameParams,
    "bdev_error_create" => BdevErrorCreateParams,
    "bdev_error_delete" => NameParams,
    "bdev_error_inject_error" => BdevErrorInjectErrorParams,
    "bdev_delay_create" => BdevDelayCreateParams,
    "bdev_delay_delete" => NameParams,
    "bdev_delay_update_latency" => BdevDelayUpdateLatencyParams,
    "bdev_cache_create" => BdevCacheCreateParams,
    "bdev_cache_delete" => NameParams,
    "bdev_cache_get_bdevs" => BdevCacheGetBdevsParams,
    "bdev_cache_get_stats" => NameParams,
    "bdev_cache_reset_stats" => NameParams,
    "bdev_cache_set_cache_mode" => BdevCacheSetCacheModeParams,
    "bdev_cache_set_seqcutoff" => BdevCacheSetSeqcutoffParams,
    "bdev_cache_set_options" => BdevCacheSetOptionsParams,
    "bdev_cache_flush_start" => NameParams,
    "bdev_cache_flush_status" => NameParams,
    "bdev_cache_detach" => NameParams,
    "bdev_cache_attach" => BdevCacheAttachParams,
    "bdev_cache_load" => BdevCacheLoadParams,
    "nbd_server_start" => NbdServerStartParams,
    "nbd_export_add" => NbdExportAddParams,
    "nbd_export_remove" => NbdExportRemoveParams,
    "nbd_get_exports" => NbdGetExportsParams,
    "nbd_server_stop" => NoParams,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err<P: DeserializeOwned + Validate + std::fmt::Debug>(v: Value) -> String {
        decode_params::<P>(Some(v)).unwrap_err().to_string()
    }

    #[test]
    fn malloc_decoding_and_errors() {
        let p: BdevMallocCreateParams =
            decode_params(Some(json!({"name":"Malloc0","num_blocks":8,"block_size":512}))).unwrap();
        assert_eq!(p.num_blocks, 8);
        let e = err::<BdevMallocCreateParams>(json!({"nmae":"x","num_blocks":8,"block_size":512}));
        assert!(e.starts_with("unknown field \"nmae\", expected one of \"name\""), "{e}");
        assert_eq!(err::<BdevMallocCreateParams>(json!({"block_size":512})), "missing field \"num_blocks\"");
        assert_eq!(err::<BdevMallocCreateParams>(json!({"num_blocks":0,"block_size":512})), "num_blocks: must be > 0");
        let e = err::<BdevMallocCreateParams>(json!({"num_blocks":"x","block_size":512}));
        assert!(e.starts_with("num_blocks: invalid type: string \"x\""), "{e}");
        let e = err::<BdevMallocCreateParams>(json!({"num_blocks":1,"block_size":513}));
        assert!(e.starts_with("block_size:"), "{e}");
        let e = err::<BdevMallocCreateParams>(json!({"num_blocks":1,"block_size":512,"uuid":"zz"}));
        assert!(e.starts_with("uuid:"), "{e}");
        let e = err::<BdevMallocCreateParams>(json!({"num_blocks":u64::MAX,"block_size":4096}));
        assert!(e.contains("overflows"), "{e}");
        let e = err::<BdevMallocCreateParams>(json!({"name":"a b","num_blocks":1,"block_size":512}));
        assert!(e.starts_with("name:"), "{e}");
        assert_eq!(decode_params::<BdevMallocCreateParams>(Some(json!([1]))), Err(ParamError::NotAnObject));
        // with too many keys the field cannot be probed but the error stays
        let mut big = Map::new();
        for i in 0..100 {
            big.insert(format!("k{i}"), json!(i));
        }
        assert!(decode_params::<NoParams>(Some(Value::Object(big))).is_err());
    }

    #[test]
    fn spdk_rpc_py_malloc_and_null_params() {
        // what rpc.py (PyPI `spdk`) sends for `bdev_malloc_create -b m1 8 512`
        decode_params::<BdevMallocCreateParams>(Some(json!({"num_blocks":16384,"block_size":512,
            "name":"m1","md_interleave":false,"dif_is_head_of_md":false})))
        .unwrap();
        decode_params::<BdevNullCreateParams>(Some(json!({"num_blocks":16384,"block_size":512,
            "name":"n1","dif_is_head_of_md":false,"md_size":0,"physical_block_size":4096})))
        .unwrap();
        let e = err::<BdevMallocCreateParams>(json!({"num_blocks":1,"block_size":512,"md_size":8}));
        assert!(e.starts_with("md_size:"), "{e}");
        let e = err::<BdevNullCreateParams>(json!({"name":"n","num_blocks":1,"block_size":512,"dif_type":1}));
        assert!(e.starts_with("dif_type:"), "{e}");
        let e =
            err::<BdevNullCreateParams>(json!({"name":"n","num_blocks":1,"block_size":4096,"physical_block_size":512}));
        assert!(e.starts_with("physical_block_size:"), "{e}");
    }

    #[test]
    fn no_params_accepts_absent_null_empty() {
        assert!(decode_params::<NoParams>(None).is_ok());
        assert!(decode_params::<NoParams>(Some(Value::Null)).is_ok());
        assert!(decode_params::<NoParams>(Some(json!({}))).is_ok());
        assert!(err::<NoParams>(json!({"x":1})).contains("unknown field \"x\""));
        assert!(decode_params::<Value>(Some(json!({"x":1}))).is_ok());
    }

    #[test]
    fn enums_and_aliases() {
        let p: BdevCacheCreateParams = decode_params(Some(json!({
            "name":"c0","mode":"wb","cache_bdev_name":"nvme","core_bdev_name":"hdd"
        })))
        .unwrap();
        assert_eq!(p.mode, CacheMode::Writeback);
        assert!(!p.format);
        assert_eq!(serde_json::to_value(p.mode).unwrap(), json!("writeback"));
        assert_eq!(CacheMode::Passthrough.to_string(), "passthrough");
        let e = err::<BdevCacheCreateParams>(json!({
            "name":"c0","mode":"fast","cache_bdev_name":"nvme","core_bdev_name":"hdd"
        }));
        assert!(e.starts_with("mode: unknown variant \"fast\""), "{e}");
        let e = err::<BdevCacheCreateParams>(json!({
            "name":"c0","mode":"wt","cache_bdev_name":"x","core_bdev_name":"x"
        }));
        assert!(e.starts_with("core_bdev_name:"), "{e}");
        let e = err::<BdevCacheCreateParams>(json!({
            "name":"c0","mode":"wt","cache_bdev_name":"x","core_bdev_name":"y","segment_size_kib":100
        }));
        assert!(e.starts_with("segment_size_kib:"), "{e}");
        for (s, v) in [("read", ErrorIoType::Read), ("write_zeroes", ErrorIoType::WriteZeroes)] {
            assert_eq!(serde_json::from_value::<ErrorIoType>(json!(s)).unwrap(), v);
            assert_eq!(v.as_str(), s);
        }
        assert_eq!(ErrorType::CorruptData.as_str(), "corrupt_data");
        assert_eq!(DelayLatencyType::P99Write.as_str(), "p99_write");
        assert_eq!(SeqCutoffPolicy::Full.as_str(), "full");
        assert_eq!(StopWhenCacheSetFailed::Auto.as_str(), "auto");
    }

    #[test]
    fn error_inject_rules() {
        let ok = |v: Value| decode_params::<BdevErrorInjectErrorParams>(Some(v)).unwrap();
        let bad = |v: Value| err::<BdevErrorInjectErrorParams>(v);
        ok(json!({"name":"EE_m","io_type":"read","error_type":"failure","num":3}));
        ok(json!({"name":"EE_m","io_type":"all","error_type":"nomem","every_nth":4}));
        ok(json!({"name":"EE_m","io_type":"write","error_type":"failure","probability":0.5,"seed":7}));
        ok(json!({"name":"EE_m","io_type":"read","error_type":"corrupt_data","corrupt_offset":3,"corrupt_value":1}));
        assert!(ok(json!({"name":"EE_m","clear":true})).is_clear());
        assert!(ok(json!({"name":"EE_m","io_type":"clear"})).is_clear());
        ok(json!({"name":"EE_m","offline":true}));
        assert_eq!(bad(json!({"name":"EE_m"})), "missing field \"io_type\"");
        assert_eq!(bad(json!({"name":"EE_m","io_type":"read"})), "missing field \"error_type\"");
        assert!(bad(json!({"name":"EE_m","io_type":"read","error_type":"failure","num":0})).starts_with("num:"));
        assert!(
            bad(json!({"name":"EE_m","io_type":"read","error_type":"failure","every_nth":0})).starts_with("every_nth:")
        );
        assert!(bad(json!({"name":"EE_m","io_type":"read","error_type":"failure","probability":1.5}))
            .starts_with("probability:"));
        assert!(bad(json!({"name":"EE_m","io_type":"read","error_type":"failure","probability":0.5,"every_nth":2}))
            .contains("exclusive"));
        assert!(bad(json!({"name":"EE_m","io_type":"read","error_type":"failure","seed":2})).contains("seed requires"));
        assert!(bad(json!({"name":"EE_m","io_type":"read","error_type":"corrupt_data"})).starts_with("corrupt_value:"));
        assert!(bad(json!({"name":"EE_m","io_type":"read","error_type":"failure","corrupt_value":1}))
            .contains("corrupt_data"));
        assert!(bad(json!({"name":"EE_m","clear":true,"error_type":"failure"})).contains("clear"));
        assert!(bad(json!({"name":"EE_m","clear":true,"offline":false})).contains("exclusive"));
        assert!(bad(json!({"name":"EE_m","offline":true,"io_type":"read"})).contains("offline"));
        assert!(bad(json!({"name":"EE_m","io_type":"bogus","error_type":"failure"})).starts_with("io_type:"));
    }

    #[test]
    fn delay_rules() {
        let base = json!({"base_bdev_name":"m0","name":"d0","avg_read_latency":10,
            "p99_read_latency":50,"avg_write_latency":30,"p99_write_latency":90});
        decode_params::<BdevDelayCreateParams>(Some(base.clone())).unwrap();
        let mut b = base.clone();
        b["p99_read_latency"] = json!(5);
        assert!(err::<BdevDelayCreateParams>(b).starts_with("p99_read_latency:"));
        let mut b = base;
        b["p99_write_latency"] = json!(5);
        assert!(err::<BdevDelayCreateParams>(b).starts_with("p99_write_latency:"));
        let u: BdevDelayUpdateLatencyParams =
            decode_params(Some(json!({"delay_bdev_name":"d0","latency_type":"p99_read","latency_us":100}))).unwrap();
        assert_eq!(u.latency_type, DelayLatencyType::P99Read);
        assert!(err::<BdevDelayUpdateLatencyParams>(
            json!({"delay_bdev_name":"d0","latency_type":"p98","latency_us":1})
        )
        .starts_with("latency_type:"));
    }

    #[test]
    fn cache_option_rules() {
        assert!(err::<BdevCacheSetOptionsParams>(json!({"name":"c"})).contains("at least one"));
        decode_params::<BdevCacheSetOptionsParams>(Some(json!({"name":"c","seal_idle_ms":5}))).unwrap();
        assert!(err::<BdevCacheSetOptionsParams>(json!({"name":"c","writeback_percent":101}))
            .starts_with("writeback_percent:"));
        for bad in [0, 101] {
            assert!(err::<BdevCacheSetOptionsParams>(json!({"name":"c","dirty_write_cutoff_percent":bad}))
                .starts_with("dirty_write_cutoff_percent:"));
        }
        assert!(err::<BdevCacheSetOptionsParams>(json!({"name":"c","writeback_rate_min":5,"writeback_rate_max":4}))
            .starts_with("writeback_rate_max:"));
        assert!(err::<BdevCacheSetOptionsParams>(json!({"name":"c","writeback_rate_max":0}))
            .starts_with("writeback_rate_max:"));
        assert!(err::<BdevCacheSetOptionsParams>(json!({"name":"c","io_error_halflife":0}))
            .starts_with("io_error_halflife:"));
        assert!(err::<BdevCacheSetOptionsParams>(json!({"name":"c","stop_when_cache_set_failed":"never"}))
            .starts_with("stop_when_cache_set_failed:"));
        assert!(err::<BdevCacheSetSeqcutoffParams>(json!({"name":"c","policy":"always","threshold":0}))
            .starts_with("threshold:"));
        assert!(err::<BdevCacheSetSeqcutoffParams>(json!({"name":"c","policy":"always","promotion_count":70000}))
            .starts_with("promotion_count:"));
        decode_params::<BdevCacheSetSeqcutoffParams>(Some(
            json!({"name":"c","policy":"full","threshold":1024,"promotion_count":8}),
        ))
        .unwrap();
        decode_params::<BdevCacheLoadParams>(Some(json!({"cache_bdev_name":"nvme"}))).unwrap();
        decode_params::<BdevCacheAttachParams>(Some(json!({"name":"c","cache_bdev_name":"nvme","format":true})))
            .unwrap();
    }

    #[test]
    fn misc_rules() {
        assert!(err::<BdevGetBdevsParams>(json!({"timeout":5})).contains("timeout requires name"));
        decode_params::<BdevGetBdevsParams>(Some(json!({"name":"m","timeout":5}))).unwrap();
        assert!(err::<BdevUringCreateParams>(json!({"filename":"","name":"u"})).starts_with("filename:"));
        assert!(err::<BdevUringCreateParams>(json!({"filename":"/dev/x","name":"u","block_size":100}))
            .starts_with("block_size:"));
        assert!(err::<BdevNullCreateParams>(json!({"name":"","num_blocks":1,"block_size":512})).starts_with("name:"));
        assert!(err::<BdevErrorCreateParams>(json!({"base_name":""})).starts_with("base_name:"));
        assert!(err::<FrameworkGetConfigParams>(json!({})).contains("\"name\""));
        assert!(err::<NameParams>(json!({"name":"x".repeat(300)})).starts_with("name:"));
        assert!(err::<NbdExportAddParams>(json!({"bdev_name":"b","export_name":""})).starts_with("export_name:"));
        assert!(err::<NbdExportRemoveParams>(json!({"export_name":""})).starts_with("export_name:"));
        let p: NbdExportAddParams = decode_params(Some(json!({"bdev_name":"b"}))).unwrap();
        assert_eq!(p.effective_export_name(), "b");
        assert!(!p.read_only);
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(ListenAddr::parse("unix:/tmp/n.sock"), Ok(ListenAddr::Unix("/tmp/n.sock".into())));
        assert_eq!(ListenAddr::parse("127.0.0.1:10809"), Ok(ListenAddr::Tcp { host: "127.0.0.1".into(), port: 10809 }));
        assert_eq!(ListenAddr::parse("[::1]:10809"), Ok(ListenAddr::Tcp { host: "::1".into(), port: 10809 }));
        for bad in ["unix:", "host", "h:99999", ":80", "::1:80", "[]:1"] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad}");
        }
        assert!(err::<NbdServerStartParams>(json!({"listen":"nope"})).starts_with("listen:"));
    }

    #[test]
    fn serialize_skips_defaults_and_roundtrips() {
        let p = BdevCacheCreateParams {
            name: "c0".into(),
            mode: CacheMode::Writethrough,
            cache_bdev_name: "a".into(),
            core_bdev_name: "b".into(),
            segment_size_kib: None,
            format: false,
            block_size: None,
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v, json!({"name":"c0","mode":"writethrough","cache_bdev_name":"a","core_bdev_name":"b"}));
        assert_eq!(decode_params::<BdevCacheCreateParams>(Some(v)).unwrap(), p);
    }

    #[test]
    fn method_table_covers_list() {
        assert_eq!(METHODS.len(), 38);
        assert!(check_params("nbd_start_disk", None).is_none());
        assert!(check_params("nbd_get_disks", None).is_none());
        assert_eq!(check_params("nbd_server_stop", None), Some(Ok(())));
        assert!(matches!(
            check_params("bdev_malloc_delete", Some(&json!({}))),
            Some(Err(ParamError::Missing(f))) if f == "name"
        ));
        for (m, _) in METHODS {
            assert!(check_params(m, Some(&json!({"__bogus": 1}))).unwrap().is_err(), "{m}");
        }
    }
}
