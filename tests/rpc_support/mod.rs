//! Shared helpers of the daemon tests: a temp dir, a daemon process that is killed on
//! every exit path, and RPC calls.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tiercache_jsonrpc::client::{Client, ClientError};
use tiercache_jsonrpc::RpcError;

pub const BIN: &str = env!("CARGO_BIN_EXE_tiercache");

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

static SEQ: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tc-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `tiercache serve`; SIGKILLed on drop unless it already exited.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Daemon {
    /// Starts `tiercache serve --rpc-socket <dir>/<tag>.sock --cores 0 <args>` and waits
    /// until its RPC socket answers.
    pub fn start(dir: &Path, tag: &str, args: &[&str]) -> Daemon {
        let socket = dir.join(format!("{tag}.sock"));
        let stdout = dir.join(format!("{tag}.out"));
        let stderr = dir.join(format!("{tag}.err"));
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--rpc-socket")
            .arg(&socket)
            .args(["--cores", "0", "--log-level", "info"])
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn tiercache serve");
        let mut d = Daemon { child: Some(child), socket, stdout, stderr };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    panic!("daemon exited early ({st}); stderr:\n{}", self.stderr_text());
                }
            }
            if Client::connect(&self.socket, Duration::from_secs(2)).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "daemon not ready in 30 s; stderr:\n{}", self.stderr_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket, Duration::from_secs(30)).expect("connect to the daemon")
    }

    /// One call on a fresh connection.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let params = if params.is_null() { None } else { Some(params) };
        match self.client().call(method, params) {
            Ok(v) => Ok(v),
            Err(ClientError::Rpc(e)) => Err(e),
            Err(e) => panic!("{method}: transport error {e}; stderr:\n{}", self.stderr_text()),
        }
    }

    /// A call that must succeed.
    pub fn ok(&self, method: &str, params: Value) -> Value {
        match self.call(method, params.clone()) {
            Ok(v) => v,
            Err(e) => panic!("{method} {params}: {e}"),
        }
    }

    /// A call that must fail with `code`; returns the message.
    pub fn err(&self, method: &str, params: Value, code: i32) -> String {
        match self.call(method, params.clone()) {
            Ok(v) => panic!("{method} {params}: expected error {code}, got {v}"),
            Err(e) => {
                assert_eq!(e.code, code, "{method} {params}: {}", e.message);
                e.message
            }
        }
    }

    /// SIGTERM, then wait (bounded) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let st = c.wait().expect("wait");
                panic!("daemon ignored SIGTERM for 30 s ({:?}); stderr:\n{}", st.signal(), self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `tiercache rpc -s SOCK args...`; (exit code, stdout, stderr).
pub fn cli(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("rpc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tiercache rpc");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `prog` is on PATH.
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {prog}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p
}

/// Reads a child's pipe completely (helper for Command::output alternatives).
pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}
