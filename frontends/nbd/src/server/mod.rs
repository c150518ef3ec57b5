//! The NBD server: listeners, exports and connections, running on the reactors.
//!
//! ```text
//!  listen() ── std bind ──> accept task on reactor (i mod n) ── io_uring accept
//!                                   │ round robin: send_msg(fd) to reactor k
//!                                   ▼
//!  reactor k: connection task ── handshake (Handshake + net::recv/send)
//!                             └─ transmission: reader loop (RequestDecoder)
//!                                  ├─ request ──> IoChannel (polled inline once;
//!                                  │              a task only if it is pending)
//!                                  └─ replies ──> writer task (one send in flight)
//! ```
//!
//! Every connection lives on one reactor and uses that reactor's [`IoChannel`]
//! of the export. A connection keeps at most [`conn::MAX_IN_FLIGHT`] requests
//! and [`conn::MAX_IN_FLIGHT_BYTES`] payload bytes in flight (a request counts
//! until its reply has been sent); beyond that it stops reading its socket,
//! which is TCP backpressure on the client.
//!
//! Control ([`NbdServer::remove_export`], [`NbdServer::stop`]) works from any
//! thread: it flags the connections and wakes them. A flagged connection
//! finishes every request it accepted, answers requests that still arrive with
//! `NBD_ESHUTDOWN` (a client MUST then disconnect), closes once it is idle,
//! and is forced closed after [`CLOSE_TIMEOUT`].
//!
//! [`IoChannel`]: tiercache_engine::bdev::IoChannel

mod conn;

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use tiercache_engine::bdev::{BdevDesc, IoType};
use tiercache_engine::reactor::{self, net, ReactorSet};
use tiercache_engine::Errno;

use crate::handshake::{BlockSizes, ExportCatalog, ExportInfo};
use crate::proto::{TransmissionFlags, DEFAULT_MAX_PAYLOAD};

pub use conn::{MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES};

/// How long `stop()` / `remove_export()` wait for connections to finish
/// their in-flight requests before forcing them closed.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a listener binds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix domain socket at this path.
    Unix(PathBuf),
    /// TCP on `host:port` (port 0 picks a free port).
    Tcp(String, u16),
}

impl ListenAddr {
    /// Parse `"unix:/path"`, `"/path"`, `"host:port"` or `"[v6addr]:port"`.
    pub fn parse(s: &str) -> Result<ListenAddr, String> {
        let s = s.trim();
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("empty unix socket path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(ListenAddr::Unix(PathBuf::from(s)));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(|| format!("bad address {s:?}: expected [addr]:port"))?;
            (h, p)
        } else {
            let (h, p) = s.rsplit_once(':').ok_or_else(|| format!("bad address {s:?}: expected host:port"))?;
            if h.contains(':') {
                return Err(format!("bad address {s:?}: IPv6 addresses need brackets, [addr]:port"));
            }
            (h, p)
        };
        if host.is_empty() {
            return Err(format!("bad address {s:?}: empty host"));
        }
        let port: u16 = port.parse().map_err(|_| format!("bad port in {s:?}"))?;
        Ok(ListenAddr::Tcp(host.to_string(), port))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(h, p) if h.contains(':') => write!(f, "[{h}]:{p}"),
            ListenAddr::Tcp(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// One export as `nbd_get_exports` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExportStatus {
    /// Export name clients ask for.
    pub name: String,
    /// The bdev behind it.
    pub bdev_name: String,
    /// Writes are refused with `EPERM`.
    pub read_only: bool,
    /// Size in bytes.
    pub size: u64,
    /// Block size of the bdev (the minimum block size advertised).
    pub block_size: u32,
    /// Connections currently using it.
    pub connections: usize,
}

/// An export: a bdev descriptor under a name.
pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) desc: BdevDesc,
    pub(crate) read_only: bool,
    pub(crate) info: ExportInfo,
    /// Set once removed; connections check it when they register.
    pub(crate) removed: AtomicBool,
}

/// Transmission flags and size constraints for a bdev.
fn export_info(name: &str, desc: &BdevDesc, read_only: bool, description: Option<String>) -> Result<ExportInfo, Errno> {
    let info = desc.bdev().info();
    let bs = info.block_size;
    let max_io = info.max_io_bytes.min(u64::from(DEFAULT_MAX_PAYLOAD)) as u32;
    let maximum = max_io - max_io % bs;
    let preferred = bs.max(4096);
    let block_sizes = BlockSizes::new(bs, preferred, maximum).map_err(|e| {
        log::warn!("nbd: export {name:?}: bdev {} has unusable geometry: {e}", info.name);
        Errno::EINVAL
    })?;
    let mut flags = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_CACHE
        | TransmissionFlags::CAN_MULTI_CONN;
    if read_only {
        flags = flags.with(TransmissionFlags::READ_ONLY);
    }
    if info.io_types.contains(IoType::Unmap) {
        flags = flags.with(TransmissionFlags::SEND_TRIM);
    }
    if info.io_types.contains(IoType::WriteZeroes) {
        flags = flags.with(TransmissionFlags::SEND_WRITE_ZEROES);
    }
    Ok(ExportInfo {
        name: name.to_string(),
        description: description.unwrap_or_default(),
        size: info.size_bytes(),
        flags,
        block_sizes,
    })
}

/// The part of a connection other threads see (control and accounting).
pub(crate) struct ConnCtl {
    pub(crate) id: u64,
    pub(crate) sock: Sock,
    /// Finish in-flight requests, then close.
    pub(crate) closing: AtomicBool,
    /// Close now, even with requests in flight (after the close timeout).
    pub(crate) force: AtomicBool,
    /// The connection task, to wake it when `closing` is set.
    pub(crate) waker: Mutex<Option<Waker>>,
    /// The export this connection was negotiated for.
    pub(crate) export: Mutex<Option<Arc<Export>>>,
}

impl ConnCtl {
    fn signal_close(&self, force: bool) {
        self.closing.store(true, Ordering::Release);
        if force {
            self.force.store(true, Ordering::Release);
            // Unblocks a recv or send stuck on a silent peer.
            self.sock.shutdown(Shutdown::Both);
        }
        let w = lock(&self.waker).take();
        if let Some(w) = w {
            w.wake();
        }
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn export_is(&self, e: &Arc<Export>) -> bool {
        lock(&self.export).as_ref().is_some_and(|x| Arc::ptr_eq(x, e))
    }
}

/// An accepted socket.
pub(crate) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub(crate) fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        };
    }
}

enum ListenSock {
    Tcp(TcpListener),
    Unix(UnixListener),
}

struct Listener {
    /// As returned by `listen()`.
    addr: String,
    sock: ListenSock,
    /// Where to connect to wake the accept task (the bound address, with a
    /// wildcard host replaced by loopback).
    wake: ListenAddrResolved,
    closing: AtomicBool,
    unix_path: Option<PathBuf>,
}

enum ListenAddrResolved {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match &self.sock {
            ListenSock::Tcp(l) => l.as_raw_fd(),
            ListenSock::Unix(l) => l.as_raw_fd(),
        }
    }

    /// Stop accepting: flag it, then wake the pending accept with a
    /// connection of our own (the accept loop drops it and exits).
    fn close(&self) {
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        match &self.wake {
            ListenAddrResolved::Tcp(a) => {
                let _ = TcpStream::connect_timeout(a, Duration::from_millis(500));
            }
            ListenAddrResolved::Unix(p) => {
                let _ = UnixStream::connect(p);
            }
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[derive(Default)]
struct Conns {
    map: HashMap<u64, Arc<ConnCtl>>,
}

/// Exports by name (`.0`) and names in insertion order (`.1`).
type ExportTable = (HashMap<String, Arc<Export>>, Vec<String>);

/// State shared by the server handle, the accept tasks and the connections.
pub(crate) struct Shared {
    pub(crate) reactors: ReactorSet,
    /// Exports by name, and their insertion order (the first is the default).
    exports: Mutex<ExportTable>,
    conns: Mutex<Conns>,
    conns_changed: Condvar,
    next_conn: AtomicU64,
    next_reactor: AtomicUsize,
    pub(crate) stopping: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn export(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.exports).0.get(name).cloned()
    }

    fn register_conn(&self, sock: Sock) -> Option<Arc<ConnCtl>> {
        let ctl = Arc::new(ConnCtl {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            sock,
            closing: AtomicBool::new(false),
            force: AtomicBool::new(false),
            waker: Mutex::new(None),
            export: Mutex::new(None),
        });
        let mut c = lock(&self.conns);
        // Checked under the table lock: stop() flags every connection it finds
        // there after setting `stopping`.
        if self.stopping.load(Ordering::Acquire) {
            return None;
        }
        c.map.insert(ctl.id, ctl.clone());
        Some(ctl)
    }

    /// Bind a negotiated connection to its export; false if the export went
    /// away (or changed) since the handshake looked it up.
    pub(crate) fn attach(&self, ctl: &ConnCtl, negotiated: &ExportInfo) -> Option<Arc<Export>> {
        let ex = self.export(&negotiated.name)?;
        if ex.info != *negotiated {
            return None;
        }
        let _c = lock(&self.conns);
        // remove_export() sets `removed` before collecting connections under
        // this lock, so a connection is either collected or sees the flag.
        if ex.removed.load(Ordering::Acquire) {
            return None;
        }
        *lock(&ctl.export) = Some(ex.clone());
        Some(ex)
    }

    pub(crate) fn unregister_conn(&self, id: u64) {
        lock(&self.conns).map.remove(&id);
        self.conns_changed.notify_all();
    }

    /// Wait until no registered connection satisfies `pred`, up to `deadline`.
    fn wait_conns(&self, deadline: Instant, pred: impl Fn(&ConnCtl) -> bool) -> bool {
        let mut c = lock(&self.conns);
        loop {
            if !c.map.values().any(|x| pred(x)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            c = self.conns_changed.wait_timeout(c, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Flag the matching connections, wait for them (off-reactor only), force
    /// the stragglers.
    fn close_conns(&self, what: &str, pred: impl Fn(&ConnCtl) -> bool) {
        let victims: Vec<Arc<ConnCtl>> = lock(&self.conns).map.values().filter(|c| pred(c)).cloned().collect();
        for c in &victims {
            c.signal_close(false);
        }
        if victims.is_empty() || reactor::current().is_some() {
            // On a reactor we must not block: the connections finish on their own
            // (each one forces itself closed after CLOSE_TIMEOUT).
            return;
        }
        let ids: Vec<u64> = victims.iter().map(|c| c.id).collect();
        let in_set = |c: &ConnCtl| ids.contains(&c.id);
        if self.wait_conns(Instant::now() + CLOSE_TIMEOUT, in_set) {
            return;
        }
        log::warn!("nbd: {what}: connections still busy after {CLOSE_TIMEOUT:?}; forcing them closed");
        for c in &victims {
            c.signal_close(true);
        }
        if !self.wait_conns(Instant::now() + Duration::from_secs(1), in_set) {
            log::error!("nbd: {what}: connections did not exit after being forced closed; leaving them behind");
        }
    }
}

/// Live view of the exports for the handshake (`NBD_OPT_LIST`, `GO`, ...).
pub(crate) struct Catalog(pub(crate) Arc<Shared>);

impl ExportCatalog for Catalog {
    fn for_each_export(&self, f: &mut dyn FnMut(&str, &str)) {
        let ex = lock(&self.0.exports);
        for name in &ex.1 {
            if let Some(e) = ex.0.get(name) {
                f(&e.info.name, &e.info.description);
            }
        }
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let ex = lock(&self.0.exports);
        let name = if name.is_empty() { ex.1.first()? } else { name };
        ex.0.get(name).map(|e| e.info.clone())
    }
}

/// An NBD server on a set of reactors. Cheap to share (`Arc`); every method
/// may be called from any thread. See the module docs.
pub struct NbdServer {
    shared: Arc<Shared>,
    listeners: Mutex<Vec<Arc<Listener>>>,
    stopped: AtomicBool,
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl NbdServer {
    /// A server with no listeners and no exports.
    pub fn new(reactors: ReactorSet) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            shared: Arc::new(Shared {
                reactors,
                exports: Mutex::new((HashMap::new(), Vec::new())),
                conns: Mutex::new(Conns::default()),
                conns_changed: Condvar::new(),
                next_conn: AtomicU64::new(1),
                next_reactor: AtomicUsize::new(0),
                stopping: AtomicBool::new(false),
            }),
            listeners: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
        })
    }

    /// Start a listener; returns the address it is bound to (`"unix:/path"`,
    /// `"127.0.0.1:10809"`, `"[::1]:10809"`; a TCP port 0 is resolved).
    pub fn listen(&self, addr: &ListenAddr) -> io::Result<String> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "NBD server is stopped"));
        }
        let listener = match addr {
            ListenAddr::Tcp(host, port) => {
                let addrs: Vec<SocketAddr> = (host.as_str(), *port).to_socket_addrs()?.collect();
                let l = TcpListener::bind(&addrs[..])?;
                let local = l.local_addr()?;
                if !local.ip().is_loopback() {
                    log::warn!(
                        "nbd: listening on non-loopback address {local}: NBD has no authentication or \
                         encryption, anyone who can reach it can read and write the exports"
                    );
                }
                let mut wake = local;
                if wake.ip().is_unspecified() {
                    wake.set_ip(match wake {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                let shown = if is_loopback_host(host) || host.parse::<std::net::IpAddr>().is_ok() {
                    local.to_string()
                } else {
                    ListenAddr::Tcp(host.clone(), local.port()).to_string()
                };
                Listener {
                    addr: shown,
                    sock: ListenSock::Tcp(l),
                    wake: ListenAddrResolved::Tcp(wake),
                    closing: AtomicBool::new(false),
                    unix_path: None,
                }
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path)?;
                if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)) {
                    log::warn!("nbd: cannot chmod 0660 {}: {e}", path.display());
                }
                Listener {
                    addr: addr.to_string(),
                    sock: ListenSock::Unix(l),
                    wake: ListenAddrResolved::Unix(path.clone()),
                    closing: AtomicBool::new(false),
                    unix_path: Some(path.clone()),
                }
            }
        };
        let listener = Arc::new(listener);
        let shown = listener.addr.clone();
        let n = self.shared.reactors.len().max(1);
        let target = lock(&self.listeners).len() % n;
        let (l2, sh) = (listener.clone(), self.shared.clone());
        let start = move || {
            reactor::spawn_detached(accept_loop(sh, l2));
            async {}
        };
        let spawned = if reactor::current().is_some() {
            // Called on a reactor (of this set, presumably): never block here.
            drop(start());
            true
        } else {
            self.shared.reactors.block_on(target, start).is_ok()
        };
        if !spawned {
            listener.close();
            return Err(io::Error::other("reactors are stopped"));
        }
        log::info!("nbd: listening on {shown}");
        lock(&self.listeners).push(listener);
        Ok(shown)
    }

    /// Addresses of the running listeners.
    pub fn listeners(&self) -> Vec<String> {
        lock(&self.listeners).iter().map(|l| l.addr.clone()).collect()
    }

    /// Export `desc` as `name`. EEXIST if the name is taken, EINVAL for an
    /// empty or over-long name or a bdev geometry NBD cannot express.
    pub fn add_export(
        &self,
        name: &str,
        desc: BdevDesc,
        read_only: bool,
        description: Option<String>,
    ) -> Result<(), Errno> {
        if name.is_empty() || name.len() > crate::proto::MAX_STRING_LEN || name.contains('\0') {
            return Err(Errno::EINVAL);
        }
        let info = export_info(name, &desc, read_only, description)?;
        let mut ex = lock(&self.shared.exports);
        if ex.0.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let e = Arc::new(Export { name: name.to_string(), desc, read_only, info, removed: AtomicBool::new(false) });
        ex.0.insert(name.to_string(), e);
        ex.1.push(name.to_string());
        log::info!("nbd: export {name:?} added (bdev {})", self.bdev_name(name).unwrap_or_default());
        Ok(())
    }

    fn bdev_name(&self, export: &str) -> Option<String> {
        self.shared.export(export).map(|e| e.desc.name().to_string())
    }

    /// Remove an export (ENODEV if unknown). New connections cannot select it;
    /// its connections finish the requests they accepted (with errors if the
    /// bdev is gone), then disconnect. Waits for that up to [`CLOSE_TIMEOUT`]
    /// (then forces them) unless called on a reactor thread.
    pub fn remove_export(&self, name: &str) -> Result<(), Errno> {
        let e = {
            let mut ex = lock(&self.shared.exports);
            let e = ex.0.remove(name).ok_or(Errno::ENODEV)?;
            ex.1.retain(|n| n != name);
            e
        };
        {
            let _c = lock(&self.shared.conns);
            e.removed.store(true, Ordering::Release);
        }
        self.shared.close_conns(&format!("remove_export({name:?})"), |c| c.export_is(&e));
        log::info!("nbd: export {name:?} removed");
        Ok(())
    }

    /// Every export, in the order they were added.
    pub fn exports(&self) -> Vec<ExportStatus> {
        let list: Vec<Arc<Export>> = {
            let ex = lock(&self.shared.exports);
            ex.1.iter().filter_map(|n| ex.0.get(n).cloned()).collect()
        };
        let conns = lock(&self.shared.conns);
        list.iter()
            .map(|e| ExportStatus {
                name: e.name.clone(),
                bdev_name: e.desc.name().to_string(),
                read_only: e.read_only,
                size: e.info.size,
                block_size: e.info.block_sizes.minimum(),
                connections: conns.map.values().filter(|c| c.export_is(e)).count(),
            })
            .collect()
    }

    /// Close the listeners (removing unix socket files), then disconnect every
    /// client after its in-flight requests are answered (bounded wait, see
    /// [`NbdServer::remove_export`]). Exports stay defined. Idempotent.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let _c = lock(&self.shared.conns);
            self.shared.stopping.store(true, Ordering::Release);
        }
        let listeners = std::mem::take(&mut *lock(&self.listeners));
        for l in &listeners {
            l.close();
        }
        self.shared.close_conns("stop", |_| true);
        log::info!("nbd: server stopped");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Remove a leftover socket file nobody listens on; refuse anything else.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is in use", path.display())));
    }
    log::info!("nbd: removing stale socket {}", path.display());
    std::fs::remove_file(path)
}

/// Wrap a descriptor returned by io_uring accept.
#[allow(unsafe_code)]
fn owned_fd(fd: RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by a successful accept: it is open and
    // owned by nobody else; ownership passes to the OwnedFd.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

async fn accept_loop(shared: Arc<Shared>, listener: Arc<Listener>) {
    let fd = listener.fd();
    let tcp = matches!(listener.sock, ListenSock::Tcp(_));
    loop {
        if listener.closing.load(Ordering::Acquire) {
            break;
        }
        let res = net::accept(fd).await;
        if listener.closing.load(Ordering::Acquire) {
            if res >= 0 {
                drop(owned_fd(res));
            }
            break;
        }
        if res < 0 {
            let e = Errno::from_neg(res);
            match e.0 {
                libc::EINTR | libc::EAGAIN | libc::ECONNABORTED | libc::EPROTO | libc::EPERM => continue,
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                    log::warn!("nbd: accept on {}: {e}; retrying in 100 ms", listener.addr);
                    reactor::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                _ => {
                    log::error!("nbd: accept on {} failed: {e}; listener stopped", listener.addr);
                    break;
                }
            }
        }
        let owned = owned_fd(res);
        let sock = if tcp {
            let s = TcpStream::from(owned);
            let _ = s.set_nodelay(true);
            Sock::Tcp(s)
        } else {
            Sock::Unix(UnixStream::from(owned))
        };
        let n = shared.reactors.len().max(1);
        let target = shared.next_reactor.fetch_add(1, Ordering::Relaxed) % n;
        let Some(ctl) = shared.register_conn(sock) else {
            continue; // stopping: the socket closes here
        };
        if Some(target) == reactor::current() {
            reactor::spawn_detached(conn::run(shared.clone(), ctl));
        } else {
            let sh = shared.clone();
            let id = ctl.id;
            if reactor::send_msg(target, move || reactor::spawn_detached(conn::run(sh, ctl))).await.is_err() {
                shared.unregister_conn(id);
            }
        }
    }
    log::debug!("nbd: accept loop on {} exited", listener.addr);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_listen_addresses() {
        assert_eq!(ListenAddr::parse("unix:/tmp/a.sock"), Ok(ListenAddr::Unix("/tmp/a.sock".into())));
        assert_eq!(ListenAddr::parse("/tmp/b"), Ok(ListenAddr::Unix("/tmp/b".into())));
        assert_eq!(ListenAddr::parse("127.0.0.1:10809"), Ok(ListenAddr::Tcp("127.0.0.1".into(), 10809)));
        assert_eq!(ListenAddr::parse("localhost:0"), Ok(ListenAddr::Tcp("localhost".into(), 0)));
        assert_eq!(ListenAddr::parse("[::1]:99"), Ok(ListenAddr::Tcp("::1".into(), 99)));
        for bad in ["", "unix:", "host", ":80", "h:99999", "::1:80", "[::1]", "h:x"] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ListenAddr::Tcp("::1".into(), 5).to_string(), "[::1]:5");
        assert_eq!(ListenAddr::Unix("/x".into()).to_string(), "unix:/x");
    }

    #[test]
    fn server_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<NbdServer>();
    }
}
