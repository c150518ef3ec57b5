//! The built-in default configuration (`configs/default.json`) and the files it runs on.
//!
//! Paths under `tiercache-data/` in the document are moved into `--data-dir`. The data
//! directory gets `backing.img` (1 GiB) and `cache.img` (256 MiB), both sparse, when they
//! are missing. The cache is formatted only when `cache.img` was just created; on every
//! later run it is loaded (its log replayed), never reformatted.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tiercache_jsonrpc::config::ConfigDocument;

/// The default configuration, as shipped in `configs/default.json`.
pub const DEFAULT_CONFIG: &str = include_str!("../configs/default.json");
/// The data directory the default document names; replaced by `--data-dir`.
const DATA_PREFIX: &str = "tiercache-data/";
pub const BACKING_SIZE: u64 = 1 << 30;
pub const CACHE_SIZE: u64 = 256 << 20;

/// The default document, ready to replay.
pub struct Prepared {
    pub doc: ConfigDocument,
    /// `cache.img` when this run created it (removed again if the configuration fails, so
    /// the next run formats it).
    fresh_cache: Option<PathBuf>,
}

impl Prepared {
    /// Removes a cache file this run created (the configuration failed before it was
    /// formatted, or right after).
    pub fn undo_fresh_cache(&self) {
        if let Some(p) = &self.fresh_cache {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Creates the data directory and its files if missing and returns the default document
/// adapted to them. `nbd_listen`, when not empty, replaces the default NBD addresses.
pub fn prepare(data_dir: &Path, nbd_listen: &[String]) -> Result<Prepared, String> {
    std::fs::create_dir_all(data_dir).map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let dir = crate::target::absolute(data_dir);
    let backing = dir.join("backing.img");
    let cache = dir.join("cache.img");
    create_sparse(&backing, BACKING_SIZE)?;
    let fresh = create_sparse(&cache, CACHE_SIZE)?;
    if fresh {
        log::info!("created {} ({} MiB); the cache will be formatted", cache.display(), CACHE_SIZE >> 20);
    } else {
        log::info!("{} exists; loading the cache (log replay)", cache.display());
    }

    let mut v: Value = serde_json::from_str(DEFAULT_CONFIG).map_err(|e| format!("built-in default config: {e}"))?;
    relocate(&mut v, &dir);
    let mut doc = ConfigDocument::from_value(&v).map_err(|e| format!("built-in default config: {e}"))?;
    for s in &mut doc.subsystems {
        if s.subsystem == "nbd" && !nbd_listen.is_empty() {
            let mut config: Vec<_> = nbd_listen
                .iter()
                .map(|a| tiercache_jsonrpc::config::ConfigEntry {
                    method: "nbd_server_start".into(),
                    params: Some(serde_json::json!({ "listen": a })),
                })
                .collect();
            config.extend(s.config.iter().filter(|e| e.method != "nbd_server_start").cloned());
            s.config = config;
        }
        for e in &mut s.config {
            if e.method == "bdev_cache_create" && fresh {
                if let Some(Value::Object(p)) = &mut e.params {
                    p.insert("format".into(), Value::Bool(true));
                }
            }
        }
    }
    // The edited document must still be valid.
    let doc = ConfigDocument::from_value(&doc.to_value()).map_err(|e| format!("default config: {e}"))?;
    Ok(Prepared { doc, fresh_cache: fresh.then_some(cache) })
}

/// Creates `path` as a sparse file of `size` bytes if it does not exist; true if created.
fn create_sparse(path: &Path, size: u64) -> Result<bool, String> {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => {
            f.set_len(size).map_err(|e| format!("cannot size {}: {e}", path.display()))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(format!("cannot create {}: {e}", path.display())),
    }
}

/// Moves every `tiercache-data/...` string (file names, `unix:` addresses) into `dir`.
fn relocate(v: &mut Value, dir: &Path) {
    match v {
        Value::String(s) => {
            let (prefix, rest) = match s.strip_prefix("unix:") {
                Some(r) => ("unix:", r),
                None => ("", s.as_str()),
            };
            if let Some(rel) = rest.strip_prefix(DATA_PREFIX) {
                *s = format!("{prefix}{}", dir.join(rel).display());
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| relocate(x, dir)),
        Value::Object(o) => o.values_mut().for_each(|x| relocate(x, dir)),
        _ => {}
    }
}
