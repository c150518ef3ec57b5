//! Shared rig for the server tests: reactors, an in-process server, exports
//! over malloc and cached bdevs, external tools, temp dirs and cleanup guards.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use tiercache_bdevs::malloc::MallocBdev;
use tiercache_engine::bdev::{Bdev, BdevDesc};
use tiercache_engine::cache::{self, CacheMode, CacheOptions, CachedBdev};
use tiercache_engine::reactor::{ReactorConfig, ReactorSet};
use tiercache_engine::sim::SimDisk;
use tiercache_nbd::{ListenAddr, NbdServer};

pub fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// A server on 2 unpinned reactors, listening on TCP loopback and a unix socket.
pub struct Rig {
    pub reactors: ReactorSet,
    pub server: Arc<NbdServer>,
    pub tcp: String,
    pub unix: PathBuf,
    pub dir: TempDir,
    cache_sets: Vec<Arc<CachedBdev>>,
}

impl Rig {
    pub fn new() -> Rig {
        init_log();
        let reactors = ReactorSet::start(ReactorConfig::unpinned(2)).expect("reactors");
        let server = NbdServer::new(reactors.clone());
        let dir = TempDir::new("nbd");
        let tcp = server.listen(&ListenAddr::Tcp("127.0.0.1".into(), 0)).expect("listen tcp");
        let unix = dir.path().join("nbd.sock");
        let shown = server.listen(&ListenAddr::Unix(unix.clone())).expect("listen unix");
        assert_eq!(shown, format!("unix:{}", unix.display()));
        Rig { reactors, server, tcp, unix, dir, cache_sets: Vec::new() }
    }

    pub fn port(&self) -> u16 {
        self.tcp.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("port")
    }

    /// Export a fresh malloc bdev of `mib` MiB.
    pub fn add_malloc(&self, name: &str, mib: u64, block_size: u32, read_only: bool) -> BdevDesc {
        let b = MallocBdev::create(&format!("m_{name}"), (mib << 20) / block_size as u64, block_size).expect("malloc");
        let desc = BdevDesc::new(b);
        self.server.add_export(name, desc.clone(), read_only, Some(format!("malloc {mib} MiB"))).expect("add_export");
        desc
    }

    /// Export a write-back cached bdev: cache and backing on the given bdevs.
    pub fn add_cached(&mut self, name: &str, cache_dev: Arc<dyn Bdev>, backing: Arc<dyn Bdev>) -> Arc<CachedBdev> {
        let rs = self.reactors.clone();
        let n = name.to_string();
        let cb = self
            .reactors
            .block_on(0, move || async move {
                let opts = CacheOptions { segment_size: 128 << 10, ..CacheOptions::default() };
                let set = cache::format(&format!("cs_{n}"), BdevDesc::new(cache_dev), rs, opts).await.expect("format");
                let b = set.attach(BdevDesc::new(backing), CacheMode::WriteBack).await.expect("attach");
                CachedBdev::new(&format!("c_{n}"), set, b)
            })
            .expect("reactor");
        self.server.add_export(name, BdevDesc::new(cb.clone()), false, Some("cached".into())).expect("add_export");
        self.cache_sets.push(cb.clone());
        cb
    }

    /// A cached export over two malloc bdevs.
    pub fn add_cached_malloc(&mut self, name: &str, cache_mib: u64, backing_mib: u64) -> Arc<CachedBdev> {
        let c = MallocBdev::create(&format!("mc_{name}"), cache_mib << 8, 4096).expect("malloc");
        let b = MallocBdev::create(&format!("mb_{name}"), backing_mib << 8, 4096).expect("malloc");
        self.add_cached(name, c, b)
    }

    /// A cached export over two SimDisks (power cuts).
    pub fn add_cached_sim(&mut self, name: &str, cache_mib: u64, backing_mib: u64) -> (Arc<SimDisk>, Arc<SimDisk>) {
        let c = SimDisk::new(&format!("sc_{name}"), 512, cache_mib << 11);
        let b = SimDisk::new(&format!("sb_{name}"), 512, backing_mib << 11);
        self.add_cached(name, c.clone(), b.clone());
        (c, b)
    }

    /// Size of an export in bytes.
    pub fn size_of(&self, export: &str) -> u64 {
        self.server.exports().iter().find(|e| e.name == export).map(|e| e.size).expect("export exists")
    }

    pub fn uri_tcp(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port())
    }

    pub fn uri_unix(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix.display())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.server.stop();
        for cb in &self.cache_sets {
            cb.cache_set().stop_migration();
        }
        self.reactors.stop();
    }
}

/// The path of an external tool, or None (test skipped) when it is missing.
/// With `CI` set in the environment a missing tool fails the test instead.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = format!("{name} not found (install the Debian packages listed in scripts/test.sh)");
        if std::env::var_os("CI").is_some() {
            panic!("CI: {why}");
        }
        eprintln!("SKIP: {why}");
    }
    found
}

/// Python with the libnbd bindings (Debian installs them for /usr/bin/python3).
pub fn python_nbd() -> Option<PathBuf> {
    for py in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(py).args(["-c", "import nbd"]).output().is_ok_and(|o| o.status.success());
        if ok {
            return Some(PathBuf::from(py));
        }
    }
    let why = "python3 module nbd (python3-libnbd) not found";
    if std::env::var_os("CI").is_some() {
        panic!("CI: {why}");
    }
    eprintln!("SKIP: {why}");
    None
}

/// Run a command; panic with its output unless it succeeded.
pub fn run(cmd: &mut Command) -> Output {
    let desc = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{desc}: {e}"));
    if !out.status.success() {
        panic!(
            "{desc} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A temporary directory (on the root ext4 filesystem), removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tc-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("mkdir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Seeded bytes; the seed is printed so a failure can be replayed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    eprintln!("random data seed {seed:#x} ({len} bytes)");
    let mut v = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// A seed from the environment (`NBD_TEST_SEED`) or the clock.
pub fn seed() -> u64 {
    std::env::var("NBD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    })
}

// ---- a minimal raw NBD client (std sockets) ----------------------------------

pub const REQ_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
pub const CHUNK_MAGIC: u32 = 0x668e_33ef;

pub struct RawClient {
    pub s: TcpStream,
    pub size: u64,
    pub flags: u16,
}

pub fn header(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQ_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

impl RawClient {
    /// Fixed newstyle, NBD_OPT_EXPORT_NAME (simple replies only).
    pub fn connect(port: u16, export: &str) -> std::io::Result<RawClient> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet)?;
        assert_eq!(&greet[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt)?;
        let mut info = [0u8; 10];
        s.read_exact(&mut info)?;
        let size = u64::from_be_bytes(info[..8].try_into().expect("8"));
        let flags = u16::from_be_bytes([info[8], info[9]]);
        Ok(RawClient { s, size, flags })
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)
    }

    /// Read one simple reply: (error, cookie).
    pub fn reply(&mut self) -> std::io::Result<(u32, u64)> {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        let magic = u32::from_be_bytes(r[..4].try_into().expect("4"));
        assert_eq!(magic, SIMPLE_MAGIC, "simple reply magic");
        Ok((u32::from_be_bytes(r[4..8].try_into().expect("4")), u64::from_be_bytes(r[8..].try_into().expect("8"))))
    }

    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> std::io::Result<(u32, Vec<u8>)> {
        self.send(&header(0, 0, cookie, offset, len))?;
        let (err, c) = self.reply()?;
        assert_eq!(c, cookie);
        let mut data = vec![0u8; if err == 0 { len as usize } else { 0 }];
        self.s.read_exact(&mut data)?;
        Ok((err, data))
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> std::io::Result<u32> {
        let mut m = header(flags, 1, cookie, offset, data.len() as u32);
        m.extend_from_slice(data);
        self.send(&m)?;
        let (err, c) = self.reply()?;
        assert_eq!(c, cookie);
        Ok(err)
    }

    /// Soft disconnect; the server closes its end afterwards.
    pub fn disconnect(mut self) {
        let _ = self.send(&header(0, 2, 0, 0, 0));
        let mut b = [0u8; 1];
        let _ = self.s.read(&mut b);
    }
}
