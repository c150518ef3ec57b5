//! The NBD server of `tiercache-nbd`, as the daemon uses it.

use std::sync::Arc;

use tiercache_engine::bdev::BdevDesc;
use tiercache_engine::Errno;
pub use tiercache_nbd::server::{ListenAddr, NbdServer};

/// `NbdServer::add_export` with info logging briefly off. Its "export added" info line
/// looks the export up again while the export table's lock is still held: a self-deadlock
/// whenever info logging is enabled (reported to the NBD frontend). The line is only
/// formatted when the global max level admits it, so the level is lowered around the call
/// (callers are serialized by the target's operation lock; other threads lose at most a
/// few info lines). The daemon logs the export itself.
pub fn add_export(
    server: &Arc<NbdServer>,
    name: &str,
    desc: BdevDesc,
    read_only: bool,
    description: Option<String>,
) -> Result<(), Errno> {
    let saved = log::max_level();
    log::set_max_level(saved.min(log::LevelFilter::Warn));
    let r = server.add_export(name, desc, read_only, description);
    log::set_max_level(saved);
    r
}

/// Runs `f` on a short-lived thread and waits for it. `NbdServer::listen` (and the waits
/// of `stop` / `remove_export`) block with `ReactorSet::block_on`, which must not run
/// inside another executor — and RPC handlers and config replay are driven by one.
pub fn blocking<T: Send>(what: &str, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("nbd-ctl".into())
            .spawn_scoped(s, f)
            .map_err(|e| format!("{what}: cannot start a thread: {e}"))?
            .join()
            .map_err(|_| format!("{what}: panicked"))
    })
}
