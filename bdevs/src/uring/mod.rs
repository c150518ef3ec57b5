//! `uring`: a file or block device through the reactor's io_uring (SPDK `bdev_uring`).
//!
//! # Opening
//!
//! The path is opened read-write with `O_DIRECT`. When the filesystem refuses direct I/O —
//! at `open` (EINVAL) or when a probe read of one block fails with EINVAL — the file is
//! reopened buffered (through the page cache) and one `log::warn!` line says so.
//! [`UringOptions::direct`] can ask for buffered I/O outright.
//!
//! # Geometry
//!
//! - Block size: the one given (512 or 4096); else, for a block device, its logical block
//!   size (`BLKSSZGET`, rounded up to 512 or 4096); for a file opened with `O_DIRECT`, 512 if
//!   a 512-byte direct read works, else 4096; for a buffered file, 512. A given block size
//!   smaller than a block device's logical block size is EINVAL.
//! - Size: `BLKGETSIZE64` for a block device, the file length for a file. It must hold at
//!   least one block; a size that is not a multiple of the block size is rounded down (with
//!   a log line) and the tail is never touched.
//!
//! # I/O mapping
//!
//! | bdev I/O      | io_uring op                                                        |
//! |---------------|--------------------------------------------------------------------|
//! | read / write  | `READ` / `WRITE` at the offset (short transfers continued)         |
//! | FUA write     | `WRITE` with `RWF_DSYNC`                                           |
//! | flush         | `FSYNC` with `DATASYNC` (fdatasync)                                |
//! | unmap         | `FALLOCATE(PUNCH_HOLE | KEEP_SIZE)`                                 |
//! | write_zeroes  | `FALLOCATE(ZERO_RANGE | KEEP_SIZE)`                                 |
//!
//! When a fallocate mode answers EOPNOTSUPP (tmpfs has no ZERO_RANGE, some block devices
//! cannot punch), the range is zeroed by writing zero buffers in chunks of at most 1 MiB,
//! and the channel remembers it (later I/Os of that type go straight to the writes). Reads
//! after unmap therefore always return zeros. Read/write/flush — and unmap/write-zeroes once
//! fallocate is known to work — allocate nothing per I/O (`IoFuture::file`).
//!
//! The device has a volatile cache (the page cache, or the disk's write cache): flush and
//! FUA matter.
//!
//! # Lifetime of the descriptor
//!
//! The fd is an `OwnedFd` in an `Arc`, held by the bdev and by every channel; an I/O in
//! flight holds its channel (through the engine's `ChannelIo`), so the fd outlives it. The
//! boxed fallback futures hold their own `Arc`. An I/O future dropped mid-flight keeps only
//! its buffer alive (`FileIo` cannot keep an owner); the kernel takes its own reference to
//! the file when the SQE is submitted, which happens in the same reactor iteration, so a
//! dropped channel releases its `Arc` only after a short timer (1 ms, fired after that
//! iteration's submission).
//!
//! Registered (fixed) files and buffers are not used: `FileIo` takes a raw fd, and no
//! measurement here showed a need.

use std::any::Any;
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tiercache_engine::bdev::{
    valid_block_size, Bdev, BdevChannel, BdevInfo, IoCompletion, IoFuture, IoRequest, IoType,
};
use tiercache_engine::reactor::{self, FileIo, FileOpKind};
use tiercache_engine::{Errno, IoBuf};

/// Largest zero buffer written by the write-zeroes fallback.
pub const ZERO_CHUNK_BYTES: u64 = 1 << 20;

/// `_IOR(0x12, 114, u64)`: size of a block device in bytes.
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::Ioctl = (2 << 30) | (8 << 16) | (0x12 << 8) | 114;
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::Ioctl = (2 << 29) | (8 << 16) | (0x12 << 8) | 114;

/// Whether to use `O_DIRECT`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum DirectIo {
    /// `O_DIRECT`, falling back to buffered I/O when the filesystem refuses it.
    #[default]
    Auto,
    /// Buffered I/O through the page cache.
    Off,
}

/// Options of [`UringBdev::create_with`].
#[derive(Clone, Debug, Default)]
pub struct UringOptions {
    /// 512 or 4096; `None` picks one (see the module documentation).
    pub block_size: Option<u32>,
    pub direct: DirectIo,
    /// Fixed UUID (recreating a saved configuration); a new one when `None`.
    pub uuid: Option<uuid::Uuid>,
}

/// What was opened, and how.
struct Backing {
    file: File,
    direct: bool,
    block_device: bool,
    block_size: u32,
    /// Bytes of the file or device (before rounding down to blocks).
    raw_size: u64,
}

/// A file- or block-device-backed bdev.
pub struct UringBdev {
    info: BdevInfo,
    fd: Arc<OwnedFd>,
    path: PathBuf,
    direct: bool,
    block_device: bool,
    requested_block_size: Option<u32>,
    raw_size: u64,
}

impl UringBdev {
    /// Open `path` (a regular file or a block device) as bdev `name`.
    pub fn create(name: &str, path: &Path, block_size: Option<u32>) -> Result<Arc<UringBdev>, Errno> {
        Self::create_with(name, path, UringOptions { block_size, ..UringOptions::default() })
    }

    /// [`UringBdev::create`] with every option.
    pub fn create_with(name: &str, path: &Path, opts: UringOptions) -> Result<Arc<UringBdev>, Errno> {
        Self::create_with_opener(name, path, &opts, &open_path)
    }

    fn create_with_opener(
        name: &str,
        path: &Path,
        opts: &UringOptions,
        open: &dyn Fn(&Path, bool) -> io::Result<File>,
    ) -> Result<Arc<UringBdev>, Errno> {
        crate::check_name(name)?;
        if let Some(bs) = opts.block_size {
            if !valid_block_size(bs) {
                log::error!("uring bdev {name}: block size {bs} is not 512 or 4096");
                return Err(Errno::EINVAL);
            }
        }
        let b = open_backing(name, path, opts, open)?;
        let bs = b.block_size as u64;
        let num_blocks = b.raw_size / bs;
        if num_blocks == 0 {
            log::error!(
                "uring bdev {name}: {} holds {} bytes, less than one {bs}-byte block",
                path.display(),
                b.raw_size
            );
            return Err(Errno::EINVAL);
        }
        if b.raw_size % bs != 0 {
            log::warn!(
                "uring bdev {name}: {} is {} bytes, not a multiple of the {bs}-byte block size; using the first {} bytes ({num_blocks} blocks)",
                path.display(),
                b.raw_size,
                num_blocks * bs
            );
        }
        let mut info = BdevInfo::new(name, "Uring disk", b.block_size, num_blocks);
        if let Some(u) = opts.uuid {
            info.uuid = u;
        }
        info.volatile_cache = true;
        Ok(Arc::new(UringBdev {
            info,
            fd: Arc::new(OwnedFd::from(b.file)),
            path: path.to_path_buf(),
            direct: b.direct,
            block_device: b.block_device,
            requested_block_size: opts.block_size,
            raw_size: b.raw_size,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether I/O bypasses the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

fn open_path(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 });
    o.open(path)
}

fn last_errno() -> Errno {
    Errno::from_io(&io::Error::last_os_error())
}

/// One synchronous `O_DIRECT` read of `bs` bytes at offset 0: does the filesystem take
/// direct I/O of this size? (Creation path only, never on a reactor's data path.)
fn probe_direct(fd: RawFd, bs: u32) -> Result<(), Errno> {
    let mut buf = IoBuf::new(bs as usize);
    // SAFETY: `buf` is a live, 4096-aligned allocation of `bs` bytes owned by this frame;
    // pread writes at most `bs` bytes into it and does not keep the pointer.
    let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), bs as usize, 0) };
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

fn block_device_geometry(fd: RawFd) -> Result<(u32, u64), Errno> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one c_int to the pointer, which points to a live local.
    if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut lbs as *mut libc::c_int) } < 0 {
        return Err(last_errno());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points to a live local.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) } < 0 {
        return Err(last_errno());
    }
    Ok((u32::try_from(lbs).unwrap_or(0), size))
}

fn open_backing(
    name: &str,
    path: &Path,
    opts: &UringOptions,
    open: &dyn Fn(&Path, bool) -> io::Result<File>,
) -> Result<Backing, Errno> {
    let fail = |e: io::Error| {
        log::error!("uring bdev {name}: cannot open {}: {e}", path.display());
        Errno::from_io(&e)
    };
    let (mut file, mut direct) = match opts.direct {
        DirectIo::Off => (open(path, false).map_err(fail)?, false),
        DirectIo::Auto => match open(path, true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "uring bdev {name}: {} refuses O_DIRECT (EINVAL at open); using buffered I/O through the page cache",
                    path.display()
                );
                (open(path, false).map_err(fail)?, false)
            }
            Err(e) => return Err(fail(e)),
        },
    };
    let meta = file.metadata().map_err(fail)?;
    let ft = meta.file_type();
    if ft.is_block_device() {
        let (lbs, size) = block_device_geometry(file.as_raw_fd())?;
        if lbs == 0 || lbs > 4096 || !4096u32.is_multiple_of(lbs) {
            log::error!("uring bdev {name}: {} has an unsupported logical block size {lbs}", path.display());
            return Err(Errno::EINVAL);
        }
        let block_size = match opts.block_size {
            Some(bs) if bs < lbs => {
                log::error!("uring bdev {name}: block size {bs} is below the device's logical block size {lbs}");
                return Err(Errno::EINVAL);
            }
            Some(bs) => bs,
            None if lbs <= 512 => 512,
            None => 4096,
        };
        return Ok(Backing { file, direct, block_device: true, block_size, raw_size: size });
    }
    if !ft.is_file() {
        log::error!("uring bdev {name}: {} is neither a regular file nor a block device", path.display());
        return Err(Errno::EINVAL);
    }
    let raw_size = meta.len();
    if raw_size == 0 {
        log::error!("uring bdev {name}: {} is empty", path.display());
        return Err(Errno::EINVAL);
    }
    let block_size = if direct {
        let candidates: &[u32] = match &opts.block_size {
            Some(bs) => std::slice::from_ref(bs),
            None => &[512, 4096],
        };
        let mut found = None;
        for &bs in candidates {
            match probe_direct(file.as_raw_fd(), bs) {
                Ok(()) => {
                    found = Some(bs);
                    break;
                }
                Err(Errno::EINVAL) => continue,
                Err(e) => {
                    log::error!("uring bdev {name}: probe read of {} failed: {e}", path.display());
                    return Err(e);
                }
            }
        }
        match found {
            Some(bs) => bs,
            None => {
                log::warn!(
                    "uring bdev {name}: {} refuses O_DIRECT reads of {candidates:?} bytes (EINVAL); using buffered I/O through the page cache",
                    path.display()
                );
                file = open(path, false).map_err(fail)?;
                direct = false;
                opts.block_size.unwrap_or(512)
            }
        }
    } else {
        opts.block_size.unwrap_or(512)
    };
    Ok(Backing { file, direct, block_device: false, block_size, raw_size })
}

impl Bdev for UringBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        Ok(Box::new(UringChannel {
            info: self.info.clone(),
            raw: self.fd.as_raw_fd(),
            fd: Some(self.fd.clone()),
            support: Rc::new([Cell::new(Support::Unknown), Cell::new(Support::Unknown)]),
        }))
    }

    fn driver(&self) -> &'static str {
        "uring"
    }

    fn driver_specific(&self) -> serde_json::Value {
        serde_json::json!({
            "uring": {
                "filename": self.path.display().to_string(),
                "direct_io": self.direct,
                "block_device": self.block_device,
                "backing_bytes": self.raw_size,
            }
        })
    }

    fn config_call(&self) -> Option<(String, serde_json::Value)> {
        let mut p = serde_json::json!({
            "name": self.info.name,
            "filename": self.path.display().to_string(),
            "uuid": self.info.uuid.to_string(),
        });
        // Recreate with the block size actually in use: a probe could pick another one on a
        // different filesystem, and the data layout depends on it.
        p["block_size"] = serde_json::json!(self.requested_block_size.unwrap_or(self.info.block_size));
        Some(("bdev_uring_create".into(), p))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Whether a fallocate mode works on this file (learned at the first use per channel).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Support {
    Unknown,
    Yes,
    No,
}

const PUNCH: usize = 0;
const ZERO: usize = 1;

/// A uring bdev's channel: submits to the calling reactor's ring.
pub struct UringChannel {
    info: BdevInfo,
    raw: RawFd,
    /// Keeps `raw` open; `Option` only so Drop can move it out.
    fd: Option<Arc<OwnedFd>>,
    /// [PUNCH, ZERO]: whether each fallocate mode works.
    support: Rc<[Cell<Support>; 2]>,
}

impl UringChannel {
    fn file_io(&self, kind: FileOpKind, offset: u64, len: u64, buf: Option<IoBuf>) -> FileIo {
        // SAFETY: `raw` belongs to the `OwnedFd` this channel holds; an I/O in flight keeps
        // the channel alive (the engine's ChannelIo holds it), and Drop releases the fd only
        // after the ring submitted what was queued (see the module documentation).
        unsafe { FileIo::new(self.raw, kind, offset, len, buf) }
    }

    fn fallocate_or_zero(&self, which: usize, offset: u64, len: u64) -> IoFuture {
        let mode = libc::FALLOC_FL_KEEP_SIZE
            | if which == PUNCH { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
        let Some(fd) = self.fd.clone() else {
            return IoFuture::ready(IoCompletion::err(Errno::ENXIO, None));
        };
        match self.support[which].get() {
            Support::Yes => IoFuture::file(self.file_io(FileOpKind::Fallocate { mode }, offset, len, None)),
            Support::No => IoFuture::boxed(write_zeroes_by_writes(fd, offset, len)),
            Support::Unknown => {
                let support = self.support.clone();
                let first = self.file_io(FileOpKind::Fallocate { mode }, offset, len, None);
                IoFuture::boxed(async move {
                    let (status, _) = first.await;
                    match status {
                        Ok(()) => {
                            support[which].set(Support::Yes);
                            IoCompletion::ok(None)
                        }
                        Err(Errno::ENOTSUP) => {
                            support[which].set(Support::No);
                            log::debug!("fallocate mode {mode:#x} unsupported; zeroing with writes");
                            write_zeroes_by_writes(fd, offset, len).await
                        }
                        Err(e) => IoCompletion::err(e, None),
                    }
                })
            }
        }
    }
}

/// Zero [offset, offset+len) by writing a zero buffer of at most [`ZERO_CHUNK_BYTES`]
/// repeatedly. `len` is a multiple of the block size, so every chunk is too.
async fn write_zeroes_by_writes(fd: Arc<OwnedFd>, offset: u64, len: u64) -> IoCompletion {
    let chunk = len.min(ZERO_CHUNK_BYTES);
    let mut buf = IoBuf::zeroed(chunk as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk);
        buf.set_len(n as usize);
        // SAFETY: this future holds `fd` (an Arc of the OwnedFd) until the write completes,
        // and if it is dropped mid-flight FileIo keeps the buffer; the kernel holds the file
        // once the SQE is submitted.
        let io = unsafe { FileIo::new(fd.as_raw_fd(), FileOpKind::Write { fua: false }, offset + done, n, Some(buf)) };
        let (status, back) = io.await;
        match back {
            Some(b) => buf = b,
            None => return IoCompletion::err(Errno::EIO, None),
        }
        if let Err(e) = status {
            return IoCompletion::err(e, None);
        }
        done += n;
    }
    IoCompletion::ok(None)
}

impl BdevChannel for UringChannel {
    fn submit(&self, io: IoRequest) -> IoFuture {
        if let Err(e) = crate::check_request(&self.info, &io) {
            return IoFuture::ready(IoCompletion::err(e, io.buf));
        }
        match io.io_type {
            IoType::Read => IoFuture::file(self.file_io(FileOpKind::Read, io.offset, io.len, io.buf)),
            IoType::Write => IoFuture::file(self.file_io(FileOpKind::Write { fua: io.fua }, io.offset, io.len, io.buf)),
            IoType::Flush => IoFuture::file(self.file_io(FileOpKind::Flush, 0, 0, None)),
            IoType::Unmap => self.fallocate_or_zero(PUNCH, io.offset, io.len),
            IoType::WriteZeroes => self.fallocate_or_zero(ZERO, io.offset, io.len),
        }
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        let Some(fd) = self.fd.take() else { return };
        if reactor::current().is_some() {
            // An I/O future dropped mid-flight in this iteration may have queued an SQE that
            // the ring has not submitted yet; keep the fd until a timer fires, which happens
            // after the iteration's submission.
            reactor::spawn_detached(async move {
                reactor::sleep(Duration::from_millis(1)).await;
                drop(fd);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Captures log records of this test binary.
    struct Capture(Mutex<Vec<String>>);
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            if let Ok(mut v) = self.0.lock() {
                v.push(format!("{} {}", r.level(), r.args()));
            }
        }
        fn flush(&self) {}
    }
    static LOGS: Capture = Capture(Mutex::new(Vec::new()));

    fn logs_about(name: &str) -> Vec<String> {
        LOGS.0.lock().unwrap().iter().filter(|l| l.contains(name)).cloned().collect()
    }

    fn install_logger() {
        let _ = log::set_logger(&LOGS);
        log::set_max_level(log::LevelFilter::Debug);
    }

    fn temp_file(tag: &str, len: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tc-uring-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(tag);
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    #[test]
    fn open_refusing_o_direct_falls_back_to_buffered_with_one_warning() {
        install_logger();
        let p = temp_file("fallback", 1 << 20);
        let refuse_direct = |path: &Path, direct: bool| {
            if direct {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                open_path(path, false)
            }
        };
        let b = UringBdev::create_with_opener("fallback_unit", &p, &UringOptions::default(), &refuse_direct).unwrap();
        assert!(!b.is_direct());
        assert_eq!(b.info().block_size, 512);
        assert_eq!(b.info().num_blocks, 2048);
        let warns: Vec<_> = logs_about("fallback_unit").into_iter().filter(|l| l.starts_with("WARN")).collect();
        assert_eq!(warns.len(), 1, "{warns:?}");
        assert!(warns[0].contains("O_DIRECT") && warns[0].contains("buffered"), "{warns:?}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn other_open_errors_are_reported_not_retried() {
        let p = std::env::temp_dir().join("tc-uring-unit-does-not-exist/x");
        assert_eq!(UringBdev::create("missing_unit", &p, None).err(), Some(Errno::ENOENT));
    }

    #[test]
    fn size_not_a_block_multiple_is_rounded_down_with_a_log_line() {
        install_logger();
        let p = temp_file("odd", 3 * 4096 + 1000);
        let b = UringBdev::create("odd_unit", &p, Some(4096)).unwrap();
        assert_eq!(b.info().num_blocks, 3);
        assert!(logs_about("odd_unit").iter().any(|l| l.contains("not a multiple")));
        let tiny = temp_file("tiny", 100);
        assert_eq!(UringBdev::create("tiny_unit", &tiny, Some(512)).err(), Some(Errno::EINVAL));
        let empty = temp_file("empty", 0);
        assert_eq!(UringBdev::create("empty_unit", &empty, None).err(), Some(Errno::EINVAL));
        assert_eq!(UringBdev::create("bs_unit", &p, Some(1024)).err(), Some(Errno::EINVAL));
        for f in [p, tiny, empty] {
            std::fs::remove_file(f).unwrap();
        }
    }
}
