//! The RPC server: a Unix socket served by plain std threads.
//!
//! This is the management plane, not the I/O path: one accept thread and
//! one thread per client; each request's handler runs with
//! `futures::executor::block_on` on the connection thread (handlers hop onto
//! reactors themselves). Requests of one connection are answered in order.
//!
//! * a stale socket file is unlinked, but not if a live server answers on it
//!   (and never a non-socket file);
//! * the socket gets mode 0600 before it appears at its path (bound under a
//!   temporary name, chmod-ed, renamed);
//! * at most `max_clients` connections; over it a new connection receives
//!   one `-EBUSY` error and is closed;
//! * idle connections are closed after `idle_timeout`; a peer that does not
//!   read its responses is dropped after `write_timeout`;
//! * [`ServerHandle::stop`] joins every thread and removes the socket.

use crate::protocol::{Id, Response, RpcError};
use crate::registry::Registry;
use crate::wire::{self, Incoming, RequestDecoder};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default socket path (SPDK uses `/var/tmp/spdk.sock`).
pub const DEFAULT_SOCKET_PATH: &str = "/var/tmp/tiercache.sock";

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Socket path.
    pub path: PathBuf,
    /// Maximum simultaneous clients.
    pub max_clients: usize,
    /// Close a connection with no traffic for this long.
    pub idle_timeout: Duration,
    /// Drop a peer that does not drain its responses within this time.
    pub write_timeout: Duration,
    /// Bound on one request's bytes.
    pub max_request_bytes: usize,
    /// Socket file mode.
    pub socket_mode: u32,
    /// How often blocked threads look at the stop flag.
    pub poll_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            path: PathBuf::from(DEFAULT_SOCKET_PATH),
            max_clients: 64,
            idle_timeout: Duration::from_secs(600),
            write_timeout: Duration::from_secs(10),
            max_request_bytes: wire::DEFAULT_MAX_BUFFERED,
            socket_mode: 0o600,
            poll_interval: Duration::from_millis(50),
        }
    }
}

impl ServerConfig {
    /// Defaults with another socket path.
    pub fn with_path(path: impl Into<PathBuf>) -> Self {
        ServerConfig { path: path.into(), ..Default::default() }
    }
}

struct Shared {
    config: ServerConfig,
    registry: Arc<Registry>,
    stop: AtomicBool,
    active: AtomicUsize,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

/// A running server; stopping it (or dropping it) joins every thread and
/// removes the socket file.
pub struct ServerHandle {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    /// (device, inode) of the socket we created, so we never unlink a file
    /// someone else put there later.
    ident: Option<(u64, u64)>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("path", &self.shared.config.path)
            .field("clients", &self.active_clients())
            .finish()
    }
}

/// Starts serving `registry` on `config.path`.
pub fn start(config: ServerConfig, registry: Arc<Registry>) -> io::Result<ServerHandle> {
    let listener = bind(&config.path, config.socket_mode)?;
    listener.set_nonblocking(true)?;
    let ident = file_ident(&config.path);
    let shared = Arc::new(Shared {
        config,
        registry,
        stop: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        conns: Mutex::new(Vec::new()),
    });
    let s = shared.clone();
    let accept = std::thread::Builder::new().name("rpc-accept".into()).spawn(move || accept_loop(listener, s))?;
    log::info!("rpc server listening on {}", shared.config.path.display());
    Ok(ServerHandle { shared, accept: Some(accept), ident })
}

fn file_ident(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    ErrorKind::AddrInUse,
                    format!("another server is listening on {}", path.display()),
                ));
            }
            log::warn!("removing stale socket {}", path.display());
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file_name =
        path.file_name().ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, "socket path has no file name"))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let finish =
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = finish {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => on_connection(stream, &shared),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                reap(&shared);
                std::thread::sleep(shared.config.poll_interval);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("rpc accept failed: {e}");
                std::thread::sleep(shared.config.poll_interval);
            }
        }
    }
}

fn reap(shared: &Shared) {
    let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
    let mut i = 0;
    while i < conns.len() {
        if conns[i].is_finished() {
            let h = conns.swap_remove(i);
            let _ = h.join();
        } else {
            i += 1;
        }
    }
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn on_connection(mut stream: UnixStream, shared: &Arc<Shared>) {
    let _ = stream.set_nonblocking(false);
    let prev = shared.active.fetch_add(1, Ordering::SeqCst);
    if prev >= shared.config.max_clients {
        shared.active.fetch_sub(1, Ordering::SeqCst);
        log::warn!("rpc: refusing client, {prev} already connected");
        let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
        let err = RpcError::busy(format!("too many RPC clients (max {})", shared.config.max_clients));
        let _ = stream.write_all(&wire::encode_response(&Response::error(Id::Null, err)));
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
    let s = shared.clone();
    let spawned = std::thread::Builder::new().name("rpc-conn".into()).spawn(move || {
        let _guard = ActiveGuard(&s.active);
        if let Err(e) = serve_connection(stream, &s) {
            log::debug!("rpc connection ended: {e}");
        }
    });
    match spawned {
        Ok(h) => shared.conns.lock().unwrap_or_else(|e| e.into_inner()).push(h),
        Err(e) => log::error!("rpc: cannot spawn connection thread: {e}"),
    }
}

fn serve_connection(mut stream: UnixStream, shared: &Shared) -> io::Result<()> {
    let cfg = &shared.config;
    stream.set_read_timeout(Some(cfg.poll_interval))?;
    stream.set_write_timeout(Some(cfg.write_timeout))?;
    let mut decoder = RequestDecoder::with_limit(cfg.max_request_bytes);
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_activity = Instant::now();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if last_activity.elapsed() >= cfg.idle_timeout {
                    log::debug!("rpc: closing idle connection");
                    return Ok(());
                }
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        last_activity = Instant::now();
        decoder.push(&buf[..n]);
        while let Some(item) = decoder.next_incoming() {
            let (out, fatal) = process(&shared.registry, item);
            if let Some(bytes) = out {
                stream.write_all(&bytes)?;
            }
            if fatal {
                linger_close(&mut stream, cfg.poll_interval);
                return Ok(());
            }
            last_activity = Instant::now();
        }
    }
}

/// Closes after a fatal error so the error response is not lost: closing a
/// Unix socket with unread input makes the peer's reads fail with
/// ECONNRESET, so stop writing, discard what the peer still sends (bounded
/// in time and bytes), then close.
fn linger_close(stream: &mut UnixStream, step: Duration) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(step));
    let deadline = Instant::now() + Duration::from_millis(250);
    let mut budget: usize = 4 << 20;
    let mut buf = [0u8; 16 * 1024];
    while Instant::now() < deadline && budget > 0 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => budget = budget.saturating_sub(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Runs one decoded item; returns the bytes to send and whether the
/// connection must be closed afterwards.
fn process(registry: &Registry, item: Incoming) -> (Option<Vec<u8>>, bool) {
    match item {
        Incoming::Single(req) => {
            let resp = futures::executor::block_on(registry.handle(req));
            (resp.as_ref().map(wire::encode_response), false)
        }
        Incoming::Batch(items) => {
            let rs = futures::executor::block_on(registry.handle_batch(items));
            ((!rs.is_empty()).then(|| wire::encode_batch(&rs)), false)
        }
        Incoming::Invalid(r) => (Some(wire::encode_response(&r)), false),
        Incoming::Fatal(r) => (Some(wire::encode_response(&r)), true),
    }
}

impl ServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.shared.config.path
    }

    /// Connected clients right now.
    pub fn active_clients(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Stops accepting, waits for every connection thread (a handler in
    /// progress is allowed to finish), removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for h in conns {
            let _ = h.join();
        }
        let path = &self.shared.config.path;
        if self.ident.is_some() && file_ident(path) == self.ident {
            let _ = std::fs::remove_file(path);
        }
        self.ident = None;
        log::info!("rpc server on {} stopped", path.display());
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn tmp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tcrpc-unit-{tag}-{}.sock", std::process::id()))
    }

    fn cfg(tag: &str) -> ServerConfig {
        ServerConfig { poll_interval: Duration::from_millis(10), ..ServerConfig::with_path(tmp_path(tag)) }
    }

    fn roundtrip(path: &Path, req: &[u8]) -> Value {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req).unwrap();
        let mut js = wire::JsonStream::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(v) = js.next_value() {
                return v.unwrap();
            }
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed without a response");
            js.push(&buf[..n]);
        }
    }

    #[test]
    fn mode_stale_socket_and_live_server() {
        let c = cfg("mode");
        let path = c.path.clone();
        let _ = std::fs::remove_file(&path);
        // stale socket file: a listener that was dropped without unlinking
        drop(UnixListener::bind(&path).unwrap());
        let h = start(c.clone(), Registry::new()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // a second server must refuse while the first answers
        let e = start(c.clone(), Registry::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        let v = roundtrip(&path, br#"{"jsonrpc":"2.0","method":"rpc_get_methods","id":1}"#);
        assert_eq!(v["result"], json!(["rpc_get_methods"]));
        assert!(format!("{h:?}").contains("ServerHandle"));
        assert_eq!(h.path(), path.as_path());
        h.stop();
        assert!(!path.exists());
        // a regular file is never unlinked
        std::fs::write(&path, b"x").unwrap();
        let e = start(c, Registry::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn client_limit_and_idle_timeout() {
        let mut c = cfg("limit");
        c.max_clients = 1;
        c.idle_timeout = Duration::from_millis(300);
        let path = c.path.clone();
        let _ = std::fs::remove_file(&path);
        let h = start(c, Registry::new()).unwrap();
        let first = UnixStream::connect(&path).unwrap();
        let t0 = Instant::now();
        while h.active_clients() == 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let v = roundtrip(&path, b"");
        assert_eq!(v["error"]["code"], json!(-libc::EBUSY));
        // the first connection is closed once idle
        let mut first = first;
        first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(first.read(&mut b).unwrap(), 0);
        let t0 = Instant::now();
        while h.active_clients() != 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let v = roundtrip(&path, br#"{"jsonrpc":"2.0","method":"rpc_get_methods","id":2}"#);
        assert_eq!(v["id"], json!(2));
        drop(h); // Drop stops too
        assert!(!path.exists());
    }

    #[test]
    fn bad_paths() {
        let e = start(ServerConfig::with_path("/"), Registry::new()).unwrap_err();
        assert_ne!(e.kind(), ErrorKind::AddrInUse);
        let e = start(ServerConfig::with_path("/nonexistent-dir-tc/x.sock"), Registry::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
