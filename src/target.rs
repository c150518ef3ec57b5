//! The application: reactors, bdevs, cache sets, the NBD server and the RPC server, brought
//! up from a configuration and shut down in order on SIGINT/SIGTERM.
//!
//! A watcher thread removes the NBD exports of cached bdevs that became Stopped (dead).
//!
//! Shutdown order: stop the export watcher → stop NBD (clients are disconnected cleanly) → FLUSH every cached bdev
//! (every reactor's open log segment reaches the cache device) → stop the migration
//! (writeback) threads → stop the RPC server → stop the reactors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::Value;
use signal_hook::consts::{SIGINT, SIGTERM};
use tiercache_engine::bdev::{BdevDesc, BdevRegistry, IoStats};
use tiercache_engine::cache::failure::BackingState;
use tiercache_engine::cache::{CacheSet, CachedBdev};
use tiercache_engine::reactor::{ReactorConfig, ReactorSet};
use tiercache_engine::Errno;
use tiercache_jsonrpc::config::{ConfigAssembler, ConfigDocument};
use tiercache_jsonrpc::server::{self, ServerConfig};
use tiercache_jsonrpc::{Registry, RpcError};

use crate::nbd_glue::NbdServer;
use crate::ServeArgs;

/// A cache set, by the name of its cache bdev.
pub struct CacheSetEntry {
    pub set: Arc<CacheSet>,
    /// The claim label held on the cache bdev.
    pub claimer: String,
    /// Cached bdevs built on this set, in creation order.
    pub members: Vec<String>,
    /// Core bdevs whose cached bdev was deleted while the set stayed up for others (the
    /// engine keeps them attached: they cannot be attached again until the set closes).
    pub retired_cores: Vec<String>,
    /// "formatted" (by this daemon) or "loaded" (log replayed).
    pub origin: &'static str,
    pub segment_size_kib: u32,
    /// Set by `bdev_cache_flush_start`.
    pub flush: Option<FlushProgress>,
    /// Baseline of the set's counters taken by `bdev_cache_reset_stats` (the engine's
    /// counters are shared with the I/O path and never zeroed).
    pub counters_base: Option<Vec<(&'static str, u64)>>,
}

/// Progress of a requested flush (drain of every dirty block of a set).
#[derive(Clone, Copy)]
pub struct FlushProgress {
    pub started: Instant,
    pub dirty_at_start: u64,
}

/// Progress of a requested detach of one cached bdev.
#[derive(Clone, Copy)]
pub struct DetachProgress {
    pub started: Instant,
    pub dirty_at_start: u64,
}

/// One NBD export, as configured.
#[derive(Clone)]
pub struct ExportRec {
    pub bdev_name: String,
    pub read_only: bool,
    pub description: Option<String>,
}

/// The NBD frontend's state. The server object exists from the first `nbd_server_start`
/// or `nbd_export_add` until `nbd_server_stop`.
#[derive(Default)]
pub struct NbdState {
    pub server: Option<Arc<NbdServer>>,
    /// (address as requested, address bound).
    pub listeners: Vec<(String, String)>,
    pub exports: BTreeMap<String, ExportRec>,
}

/// The application state shared by every RPC handler.
pub struct Target {
    pub reactors: ReactorSet,
    pub bdevs: BdevRegistry,
    pub caches: Mutex<BTreeMap<String, CacheSetEntry>>,
    pub nbd: Mutex<NbdState>,
    pub registry: Arc<Registry>,
    pub assembler: Arc<ConfigAssembler>,
    /// Serializes operations that change the configuration (create, delete, attach...).
    pub ops: futures::lock::Mutex<()>,
    pub started: Instant,
    /// Next number of a generated `MallocN` name.
    pub malloc_seq: AtomicU64,
    /// Baselines of `bdev_cache_reset_stats`, by cached bdev name.
    pub stats_base: Mutex<HashMap<String, IoStats>>,
    /// Detaches requested with `bdev_cache_detach`, by cached bdev name.
    pub detaches: Mutex<HashMap<String, DetachProgress>>,
    /// Set when the daemon shuts down (stops the export watcher).
    pub stopping: AtomicBool,
}

/// Locks a std mutex, ignoring poisoning (a panicking handler must not wedge the daemon).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An RPC error carrying `e`'s errno, with `what` and the errno's description.
pub fn errno_err(e: Errno, what: impl std::fmt::Display) -> RpcError {
    RpcError::from_errno(e.0, format!("{what}: {e}"))
}

/// The error of a reactor that stopped before answering.
pub fn canceled() -> RpcError {
    RpcError::from_errno(libc::ESHUTDOWN, "the reactors are stopping")
}

impl Target {
    pub fn new(reactors: ReactorSet) -> Arc<Target> {
        Arc::new(Target {
            reactors,
            bdevs: BdevRegistry::new(),
            caches: Mutex::new(BTreeMap::new()),
            nbd: Mutex::new(NbdState::default()),
            registry: Registry::new(),
            assembler: ConfigAssembler::new(),
            ops: futures::lock::Mutex::new(()),
            started: Instant::now(),
            malloc_seq: AtomicU64::new(0),
            stats_base: Mutex::new(HashMap::new()),
            detaches: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        })
    }

    /// Runs `f` on reactor 0 and waits for it (from an RPC thread, never a reactor).
    pub async fn on_reactor<F, Fut, T>(&self, f: F) -> Result<T, RpcError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.reactors.run_on(0, f).await.map_err(|_| canceled())
    }

    /// Opens `name`, or ENODEV naming it.
    pub fn open(&self, name: &str) -> Result<BdevDesc, RpcError> {
        self.bdevs.open(name).map_err(|_| RpcError::no_device(format!("bdev {name} not found")))
    }

    /// The cached bdev `name` (ENODEV if absent or not a cached bdev).
    pub fn cached_bdev(&self, name: &str) -> Result<(BdevDesc, Arc<CacheSet>), RpcError> {
        let desc = self.open(name)?;
        let Some(cb) = desc.bdev().as_any().downcast_ref::<CachedBdev>() else {
            return Err(RpcError::no_device(format!(
                "bdev {name} is not a cached bdev (driver {})",
                desc.bdev().driver()
            )));
        };
        let set = cb.cache_set().clone();
        Ok((desc, set))
    }

    /// The name of the cache bdev whose set `set` is.
    pub fn cache_key_of(&self, set: &Arc<CacheSet>) -> Option<String> {
        lock(&self.caches).iter().find(|(_, e)| Arc::ptr_eq(&e.set, set)).map(|(k, _)| k.clone())
    }

    /// Why `name` cannot be deleted right now (claimed by another bdev, exported over NBD).
    pub fn check_deletable(&self, name: &str) -> Result<(), RpcError> {
        if let Some(by) = self.bdevs.claimed_by(name) {
            return Err(RpcError::busy(format!("bdev {name} is claimed by {by}; delete {by} first")));
        }
        let nbd = lock(&self.nbd);
        if let Some((export, _)) = nbd.exports.iter().find(|(_, e)| e.bdev_name == name) {
            return Err(RpcError::busy(format!(
                "bdev {name} is exported over NBD as \"{export}\"; remove the export first (nbd_export_remove)"
            )));
        }
        Ok(())
    }

    /// Removes `name` from the registry and closes its channels on every reactor. The
    /// caller checked [`check_deletable`](Self::check_deletable).
    pub async fn unregister(&self, name: &str) -> Result<BdevDesc, RpcError> {
        let desc = self.bdevs.unregister(name).map_err(|e| match e {
            Errno::EBUSY => RpcError::busy(format!(
                "bdev {name} is claimed by {}",
                self.bdevs.claimed_by(name).unwrap_or_else(|| "another bdev".into())
            )),
            Errno::ENODEV => RpcError::no_device(format!("bdev {name} not found")),
            e => errno_err(e, format!("cannot delete bdev {name}")),
        })?;
        desc.close_channels(&self.reactors).await;
        Ok(desc)
    }

    /// FLUSH through every cached bdev (every reactor's open segment is written).
    pub fn flush_cached_bdevs(&self) {
        let members: Vec<String> = lock(&self.caches).values().flat_map(|e| e.members.clone()).collect();
        for name in members {
            let Ok(desc) = self.bdevs.open(&name) else { continue };
            let r = self.reactors.block_on(0, move || async move {
                let ch = desc.channel()?;
                ch.flush().await.status
            });
            match r {
                Ok(Ok(())) => log::info!("shutdown: flushed {name}"),
                Ok(Err(e)) => log::error!("shutdown: flush of {name} failed: {e}"),
                Err(_) => log::error!("shutdown: flush of {name}: reactors already stopped"),
            }
        }
    }

    /// Stops every cache set's migration thread.
    pub fn stop_migration(&self) {
        let sets: Vec<(String, Arc<CacheSet>)> =
            lock(&self.caches).iter().map(|(k, e)| (k.clone(), e.set.clone())).collect();
        for (name, set) in sets {
            set.stop_migration();
            log::info!(
                "shutdown: cache set {name}: migration stopped, {} dirty blocks kept in the log",
                set.dirty_blocks()
            );
        }
    }

    /// Whether `name` is a cached bdev in the Stopped (dead) state.
    fn is_dead(&self, name: &str) -> bool {
        self.bdevs
            .get(name)
            .and_then(|b| b.as_any().downcast_ref::<CachedBdev>().map(|cb| cb.backing().state()))
            .is_some_and(|s| s == BackingState::Stopped)
    }

    /// Removes the NBD exports of cached bdevs that are stopped (dead): their clients get
    /// the answers to the requests in flight and a clean disconnect, rather than an export
    /// that fails every request for ever. Returns the exports removed. Runs on a plain
    /// thread (never inside an executor: `remove_export` waits on the reactors).
    pub fn reap_dead_exports(&self) -> Vec<String> {
        let dead: Vec<(String, String)> = {
            let nbd = lock(&self.nbd);
            nbd.exports.iter().map(|(k, e)| (k.clone(), e.bdev_name.clone())).collect()
        };
        let dead: Vec<(String, String)> = dead.into_iter().filter(|(_, b)| self.is_dead(b)).collect();
        if dead.is_empty() {
            return Vec::new();
        }
        let _g = futures::executor::block_on(self.ops.lock());
        let mut removed = Vec::new();
        for (export, bdev) in dead {
            let server = {
                let nbd = lock(&self.nbd);
                // Re-checked under the operation lock: an RPC may have changed it.
                if nbd.exports.get(&export).is_none_or(|e| e.bdev_name != bdev) {
                    continue;
                }
                nbd.server.clone()
            };
            if let Some(s) = server {
                if let Err(e) = s.remove_export(&export) {
                    if e != Errno::ENODEV {
                        log::error!("NBD export {export} of stopped bdev {bdev}: cannot remove it: {e}");
                        continue;
                    }
                }
            }
            lock(&self.nbd).exports.remove(&export);
            log::warn!(
                "NBD export {export} removed: cached bdev {bdev} is stopped (dead); its clients were disconnected"
            );
            removed.push(export);
        }
        removed
    }

    /// Starts the thread that tears down exports of stopped cached bdevs (every 200 ms,
    /// until [`stopping`](Self::stopping) is set).
    pub fn start_export_watcher(self: &Arc<Self>) -> Option<std::thread::JoinHandle<()>> {
        let t = self.clone();
        let r = std::thread::Builder::new().name("export-watch".into()).spawn(move || {
            while !t.stopping.load(Ordering::Acquire) {
                t.reap_dead_exports();
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        match r {
            Ok(h) => Some(h),
            Err(e) => {
                log::error!("cannot start the export watcher thread: {e}; exports of stopped bdevs stay up");
                None
            }
        }
    }

    /// Stops the NBD server (disconnecting its clients).
    pub fn stop_nbd(&self) {
        let server = lock(&self.nbd).server.take();
        if let Some(s) = server {
            s.stop();
            log::info!("shutdown: NBD server stopped");
        }
    }
}

/// `tiercache serve`.
pub fn serve(args: ServeArgs) -> Result<(), String> {
    let mut rc = match &args.cores {
        Some(list) => {
            ReactorConfig::pinned(&ReactorConfig::parse_core_list(list).map_err(|e| format!("--cores: {e}"))?)
        }
        None => ReactorConfig::default(),
    };
    rc.busy_poll = args.busy_poll;
    // Register the signal handlers before anything else runs, so an early SIGTERM still
    // goes through the ordered shutdown.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let reactors = ReactorSet::start(rc).map_err(|e| format!("cannot start the reactors: {e}"))?;
    log::info!("{} reactor(s) started (busy_poll: {})", reactors.len(), args.busy_poll);
    let target = Target::new(reactors.clone());
    if let Err(e) = crate::methods::register_all(&target) {
        reactors.stop();
        return Err(format!("cannot register the RPC methods: {e}"));
    }

    let outcome = configure(&target, &args);
    let rpc = match outcome {
        Ok(()) => server::start(ServerConfig::with_path(&args.rpc_socket), target.registry.clone())
            .map_err(|e| format!("cannot start the RPC server on {}: {e}", args.rpc_socket.display())),
        Err(e) => Err(e),
    };
    let rpc = match rpc {
        Ok(h) => h,
        Err(e) => {
            shutdown(&target, None);
            return Err(e);
        }
    };
    let watcher = target.start_export_watcher();
    print_banner(&target, &args);

    let sig = signals.forever().next().unwrap_or(SIGTERM);
    log::info!("received {}, shutting down", if sig == SIGINT { "SIGINT" } else { "SIGTERM" });
    target.stopping.store(true, Ordering::Release);
    if let Some(h) = watcher {
        let _ = h.join();
    }
    shutdown(&target, Some(rpc));
    log::info!("shutdown complete");
    Ok(())
}

/// Applies the configuration: `--config FILE`, or the built-in default.
fn configure(target: &Arc<Target>, args: &ServeArgs) -> Result<(), String> {
    let doc = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            ConfigDocument::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => {
            let prepared = crate::defaults::prepare(&args.data_dir, &args.nbd_listen)?;
            let r = prepared.doc.replay_blocking(&target.registry);
            return match r {
                Ok(n) => {
                    log::info!("default configuration applied ({n} calls)");
                    Ok(())
                }
                Err(e) => {
                    prepared.undo_fresh_cache();
                    Err(format!("default configuration: {e}"))
                }
            };
        }
    };
    let n = doc.replay_blocking(&target.registry).map_err(|e| e.to_string())?;
    log::info!("configuration applied ({n} calls)");
    for addr in &args.nbd_listen {
        futures::executor::block_on(
            target.registry.call("nbd_server_start", Some(serde_json::json!({"listen": addr}))),
        )
        .map_err(|e| format!("--nbd-listen {addr}: {}", e.message))?;
    }
    Ok(())
}

fn print_banner(target: &Arc<Target>, args: &ServeArgs) {
    let (listeners, exports) = {
        let nbd = lock(&target.nbd);
        (nbd.listeners.clone(), nbd.exports.keys().cloned().collect::<Vec<_>>())
    };
    let sock = args.rpc_socket.display();
    println!("tiercache is running ({} reactors). JSON-RPC: {sock}", target.reactors.len());
    println!("  tiercache rpc -s {sock} bdev_get_bdevs");
    let Some(export) = exports.first() else {
        println!("no NBD export configured (nbd_server_start / nbd_export_add)");
        return;
    };
    for (_, bound) in &listeners {
        let uri = nbd_uri(bound, export);
        println!("NBD export \"{export}\" on {bound}:");
        println!("  nbdinfo '{uri}'");
        println!("  qemu-io -f raw -c 'read -v 0 4096' '{}'", qemu_uri(bound, export));
        println!("  mkdir -p /tmp/tc-fuse && nbdfuse /tmp/tc-fuse/{export} '{uri}' &");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

fn nbd_uri(bound: &str, export: &str) -> String {
    match bound.strip_prefix("unix:") {
        Some(path) => format!("nbd+unix:///{export}?socket={path}"),
        None => format!("nbd://{bound}/{export}"),
    }
}

fn qemu_uri(bound: &str, export: &str) -> String {
    match bound.strip_prefix("unix:") {
        Some(path) => format!("nbd:unix:{path}:exportname={export}"),
        None => format!("nbd://{bound}/{export}"),
    }
}

/// The ordered shutdown.
fn shutdown(target: &Arc<Target>, rpc: Option<server::ServerHandle>) {
    target.stop_nbd();
    target.flush_cached_bdevs();
    target.stop_migration();
    if let Some(h) = rpc {
        h.stop();
        log::info!("shutdown: RPC server stopped");
    }
    target.reactors.stop();
    log::info!("shutdown: reactors stopped");
}

/// Makes `p` absolute (relative to the current directory) without resolving symlinks.
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Params of a call as the schema accepts them: keys of a bdev module's `config_call()`
/// that the method does not take (e.g. a seed or a UUID some create methods have no
/// parameter for) are dropped, so a saved configuration always replays.
pub fn schema_clean(method: &str, mut params: Value) -> Value {
    for _ in 0..16 {
        match tiercache_jsonrpc::schema::check_params(method, Some(&params)) {
            Some(Err(tiercache_jsonrpc::ParamError::Decode(msg))) => {
                let Some(field) = msg.strip_prefix("unknown field \"").and_then(|r| r.split('"').next()) else {
                    break;
                };
                log::debug!("save_config: {method}: dropping parameter {field} (not in the schema)");
                if let Some(o) = params.as_object_mut() {
                    if o.remove(field).is_none() {
                        break;
                    }
                }
            }
            _ => break,
        }
    }
    params
}
