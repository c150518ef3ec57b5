//! Blocking client used by `tiercache rpc`, plus CLI helpers.
//!
//! ```text
//! tiercache rpc bdev_malloc_create --name m0 --num-blocks 2048 --block-size 512
//! tiercache rpc bdev_malloc_create '{"name":"m0","num_blocks":2048,"block_size":512}'
//! ```

use crate::protocol::{Id, Request, Response, RpcError};
use crate::schema::ProgressStatus;
use crate::wire::{self, JsonStream};
use serde_json::{Map, Value};
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Default time to wait for a response.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Client failures.
#[derive(Debug)]
pub enum ClientError {
    /// Connect / read / write failed.
    Io(io::Error),
    /// No (complete) response in time.
    Timeout,
    /// The server closed the connection before answering.
    Closed,
    /// The server answered something that is not a valid response.
    Protocol(String),
    /// The server answered with an error.
    Rpc(RpcError),
    /// A polled operation reported failure (see [`ProgressStatus::error`]).
    Failed(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "I/O error: {e}"),
            ClientError::Timeout => f.write_str("timed out waiting for the response"),
            ClientError::Closed => f.write_str("server closed the connection"),
            ClientError::Protocol(m) => write!(f, "bad response: {m}"),
            ClientError::Rpc(e) => write!(f, "{e}"),
            ClientError::Failed(m) => write!(f, "operation failed: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Timeout,
            _ => ClientError::Io(e),
        }
    }
}

impl ClientError {
    /// Process exit code for the CLI: the errno of an RPC error (1 if
    /// none), 2 for transport failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Rpc(e) => e.errno().map_or(1, |e| e.clamp(1, 255)),
            ClientError::Failed(_) => 1,
            _ => 2,
        }
    }
}

/// Options of [`Client::wait_until_done_with`].
#[derive(Debug, Clone, Copy)]
pub struct WaitOptions {
    /// Delay between polls.
    pub interval: Duration,
    /// Give up after this long (`None`: wait forever).
    pub timeout: Option<Duration>,
}

impl Default for WaitOptions {
    fn default() -> Self {
        WaitOptions { interval: Duration::from_millis(250), timeout: None }
    }
}

/// A connection to the RPC server.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    decoder: JsonStream,
    next_id: u64,
    timeout: Duration,
}

impl Client {
    /// Connects to `path`; `timeout` bounds each call.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path.as_ref())?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Client { stream, decoder: JsonStream::new(), next_id: 1, timeout })
    }

    /// Changes the per-call timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Calls `method` and returns its result (or the server's error).
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request::new(method, params, Id::from(id));
        self.stream.set_write_timeout(Some(self.timeout))?;
        self.stream.write_all(&wire::encode_request(&req))?;
        let resp = self.read_response()?;
        if resp.id != Id::from(id) && resp.id != Id::Null {
            return Err(ClientError::Protocol(format!("response id {:?} does not match request id {id}", resp.id)));
        }
        resp.outcome.map_err(ClientError::Rpc)
    }

    /// Sends a notification (no response is expected).
    pub fn notify(&mut self, method: &str, params: Option<Value>) -> Result<(), ClientError> {
        let req = Request::notification(method, params);
        self.stream.write_all(&wire::encode_request(&req))?;
        Ok(())
    }

    /// Reads exactly one JSON value and parses it as a response.
    fn read_response(&mut self) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(r) = self.decoder.next_value() {
                let v = r.map_err(|e| ClientError::Protocol(e.to_string()))?;
                return Response::from_value(&v).map_err(ClientError::Protocol);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Polls `method_status` until its result says `done` (see
    /// [`ProgressStatus`]), calling `on_progress` with every status.
    /// A status with `error` set ends with [`ClientError::Failed`].
    pub fn wait_until_done(
        &mut self,
        method_status: &str,
        params: Option<Value>,
        on_progress: impl FnMut(&ProgressStatus),
    ) -> Result<ProgressStatus, ClientError> {
        self.wait_until_done_with(method_status, params, WaitOptions::default(), on_progress)
    }

    /// [`wait_until_done`](Self::wait_until_done) with explicit options.
    pub fn wait_until_done_with(
        &mut self,
        method_status: &str,
        params: Option<Value>,
        opts: WaitOptions,
        mut on_progress: impl FnMut(&ProgressStatus),
    ) -> Result<ProgressStatus, ClientError> {
        let start = Instant::now();
        loop {
            let v = self.call(method_status, params.clone())?;
            let st: ProgressStatus = serde_json::from_value(v)
                .map_err(|e| ClientError::Protocol(format!("{method_status} result is not a status: {e}")))?;
            on_progress(&st);
            if let Some(e) = &st.error {
                return Err(ClientError::Failed(e.clone()));
            }
            if st.done {
                return Ok(st);
            }
            if opts.timeout.is_some_and(|t| start.elapsed() >= t) {
                return Err(ClientError::Timeout);
            }
            std::thread::sleep(opts.interval);
        }
    }
}

/// One-shot: connect, call, disconnect.
pub fn call(
    path: impl AsRef<Path>,
    method: &str,
    params: Option<Value>,
    timeout: Duration,
) -> Result<Value, ClientError> {
    Client::connect(path, timeout)?.call(method, params)
}

/// Parses the CLI words after the method name into params:
///
/// * nothing → no params;
/// * one JSON object → that object;
/// * `--key value` / `--key=value` pairs: the value is a number, `true`,
///   `false`, `null`, a JSON object/array/quoted string when it parses as
///   one, otherwise a plain string (`'"123"'` forces a string); a `--flag`
///   followed by another `--flag` or nothing is `true`; dashes in keys
///   become underscores (`--num-blocks` → `num_blocks`).
pub fn parse_cli_params(words: &[String]) -> Result<Option<Value>, String> {
    if words.is_empty() {
        return Ok(None);
    }
    if !words[0].starts_with("--") {
        if words.len() > 1 {
            return Err(format!("unexpected argument \"{}\" after the JSON params", words[1]));
        }
        return match serde_json::from_str::<Value>(&words[0]) {
            Ok(v @ Value::Object(_)) => Ok(Some(v)),
            Ok(_) => Err("params must be a JSON object".into()),
            Err(e) => Err(format!("params are not valid JSON: {e}")),
        };
    }
    let mut map = Map::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        let Some(key) = w.strip_prefix("--") else {
            return Err(format!("expected --key, got \"{w}\""));
        };
        let (key, value) = match key.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => match words.get(i + 1) {
                Some(next) if !next.starts_with("--") => {
                    i += 1;
                    (key, Some(next.clone()))
                }
                _ => (key, None),
            },
        };
        if key.is_empty() {
            return Err("empty option name".into());
        }
        let key = key.replace('-', "_");
        let value = match value {
            None => Value::Bool(true),
            Some(v) => cli_value(&v)?,
        };
        if map.insert(key.clone(), value).is_some() {
            return Err(format!("--{key} given twice"));
        }
        i += 1;
    }
    Ok(Some(Value::Object(map)))
}

fn cli_value(s: &str) -> Result<Value, String> {
    let first = s.chars().next();
    match first {
        Some('{') | Some('[') | Some('"') => {
            serde_json::from_str(s).map_err(|e| format!("value {s:?} is not valid JSON: {e}"))
        }
        _ => match serde_json::from_str::<Value>(s) {
            Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Null)) => Ok(v),
            _ => Ok(Value::String(s.to_string())),
        },
    }
}

/// Splits `METHOD [JSON] | --key value ...` into method and params.
pub fn parse_cli(words: &[String]) -> Result<(String, Option<Value>), String> {
    let (method, rest) = words.split_first().ok_or("missing method name")?;
    if method.starts_with('-') || method.is_empty() {
        return Err(format!("expected a method name, got \"{method}\""));
    }
    Ok((method.clone(), parse_cli_params(rest)?))
}

/// Pretty-prints a result like rpc.py (2-space JSON; nothing for `null`).
pub fn format_result(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        v => serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()),
    }
}

/// Formats an error like rpc.py does, with the request that caused it.
pub fn format_error(method: &str, params: Option<&Value>, err: &ClientError) -> String {
    match err {
        ClientError::Rpc(e) => {
            let req = Request::new(method, params.cloned(), Id::from(1)).to_value();
            let mut eo = Map::new();
            eo.insert("code".into(), e.code.into());
            eo.insert("message".into(), Value::String(e.message.clone()));
            if let Some(d) = &e.data {
                eo.insert("data".into(), d.clone());
            }
            format!(
                "request:\n{}\nGot JSON-RPC error response\nresponse:\n{}",
                format_result(&req),
                format_result(&Value::Object(eo))
            )
        }
        other => format!("{method}: {other}"),
    }
}

/// One progress-bar line for a [`ProgressStatus`] (`[#####-----]  50.0% flushing`).
pub fn progress_line(st: &ProgressStatus) -> String {
    const WIDTH: usize = 30;
    let state = st.state.as_deref().unwrap_or(if st.done { "done" } else { "" });
    match st.percent {
        Some(p) if p.is_finite() => {
            let p = p.clamp(0.0, 100.0);
            let filled = ((p / 100.0) * WIDTH as f64).round() as usize;
            format!("[{}{}] {:5.1}% {state}", "#".repeat(filled), "-".repeat(WIDTH - filled), p)
        }
        _ => state.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use crate::server::{self, ServerConfig};
    use serde_json::json;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn w(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cli_words_to_params() {
        assert_eq!(parse_cli_params(&[]), Ok(None));
        assert_eq!(parse_cli_params(&w(&[r#"{"a":1}"#])), Ok(Some(json!({"a":1}))));
        assert!(parse_cli_params(&w(&["[1]"])).is_err());
        assert!(parse_cli_params(&w(&["{"])).is_err());
        assert!(parse_cli_params(&w(&["{}", "x"])).is_err());
        let p = parse_cli_params(&w(&[
            "--name",
            "Malloc0",
            "--num-blocks",
            "2048",
            "--ratio",
            "0.5",
            "--offset",
            "-3",
            "--read-only",
            "--flag",
            "false",
            "--n",
            "null",
            "--obj",
            r#"{"k":[1]}"#,
            "--list",
            "[1,2]",
            "--quoted",
            r#""123""#,
            "--eq=7",
            "--last",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            p,
            json!({"name":"Malloc0","num_blocks":2048,"ratio":0.5,"offset":-3,"read_only":true,
                   "flag":false,"n":null,"obj":{"k":[1]},"list":[1,2],"quoted":"123","eq":7,"last":true})
        );
        assert!(parse_cli_params(&w(&["--a", "1", "--a", "2"])).unwrap_err().contains("twice"));
        assert!(parse_cli_params(&w(&["--a", "1", "b"])).is_err());
        assert!(parse_cli_params(&w(&["--", "1"])).is_err());
        assert!(parse_cli_params(&w(&["--o", "{bad"])).is_err());
        assert_eq!(parse_cli(&w(&["bdev_get_bdevs"])), Ok(("bdev_get_bdevs".to_string(), None)));
        assert!(parse_cli(&[]).is_err());
        assert!(parse_cli(&w(&["--x"])).is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(format_result(&Value::Null), "");
        assert_eq!(format_result(&json!({"a":1})), "{\n  \"a\": 1\n}");
        let e = ClientError::Rpc(RpcError::no_device("bdev x not found"));
        let s = format_error("bdev_get_bdevs", Some(&json!({"name":"x"})), &e);
        assert!(s.contains("\"code\": -19") && s.contains("bdev x not found") && s.contains("\"name\": \"x\""), "{s}");
        assert_eq!(e.exit_code(), libc::ENODEV);
        assert_eq!(ClientError::Timeout.exit_code(), 2);
        assert_eq!(ClientError::Rpc(RpcError::internal("x")).exit_code(), 1);
        assert!(format_error("m", None, &ClientError::Closed).contains("closed"));
        for e in
            [ClientError::Io(io::Error::other("x")), ClientError::Protocol("p".into()), ClientError::Failed("f".into())]
        {
            assert!(!e.to_string().is_empty());
        }
        let st = ProgressStatus { done: false, percent: Some(50.0), state: Some("flushing".into()), error: None };
        let line = progress_line(&st);
        assert!(line.starts_with("[###############---------------]  50.0% flushing"), "{line}");
        let st = ProgressStatus { done: true, ..Default::default() };
        assert_eq!(progress_line(&st), "done");
    }

    fn server(tag: &str, reg: Arc<Registry>) -> server::ServerHandle {
        let path = std::env::temp_dir().join(format!("tcrpc-client-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        server::start(ServerConfig { poll_interval: Duration::from_millis(10), ..ServerConfig::with_path(path) }, reg)
            .unwrap()
    }

    #[test]
    fn call_wait_and_timeouts() {
        let reg = Registry::new();
        let polls = Arc::new(AtomicU32::new(0));
        let p = polls.clone();
        reg.register_fn("bdev_cache_flush_status", move |_| {
            let n = p.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok(json!({"done": n >= 3, "percent": f64::from(n) * 33.3, "state": "flushing"})) }
        })
        .unwrap();
        reg.register_fn("fails", |_| async { Ok(json!({"done": false, "error": "EIO on cache"})) }).unwrap();
        reg.register_fn("slow", |_| async {
            std::thread::sleep(Duration::from_millis(400));
            Ok(json!(1))
        })
        .unwrap();
        reg.register_fn("notstatus", |_| async { Ok(json!(5)) }).unwrap();
        let h = server("wait", reg);
        let mut c = Client::connect(h.path(), Duration::from_secs(5)).unwrap();
        let methods = c.call("rpc_get_methods", None).unwrap();
        assert!(methods.as_array().unwrap().len() >= 5);
        let mut seen = Vec::new();
        let st = c
            .wait_until_done_with(
                "bdev_cache_flush_status",
                Some(json!({"name":"c0"})),
                WaitOptions { interval: Duration::from_millis(1), timeout: None },
                |s| seen.push(progress_line(s)),
            )
            .unwrap();
        assert!(st.done);
        assert_eq!(seen.len(), 3);
        assert!(matches!(c.wait_until_done("fails", None, |_| {}), Err(ClientError::Failed(m)) if m == "EIO on cache"));
        assert!(matches!(c.wait_until_done("notstatus", None, |_| {}), Err(ClientError::Protocol(_))));
        polls.store(0, Ordering::SeqCst);
        let r = c.wait_until_done_with(
            "bdev_cache_flush_status",
            None,
            WaitOptions { interval: Duration::from_millis(1), timeout: Some(Duration::ZERO) },
            |_| {},
        );
        assert!(matches!(r, Err(ClientError::Timeout)));
        match c.call("nope", None) {
            Err(ClientError::Rpc(e)) => assert_eq!(e.code, crate::protocol::METHOD_NOT_FOUND),
            other => panic!("{other:?}"),
        }
        c.notify("slow", None).unwrap();
        // the notification runs first (in order), then this call times out
        c.set_timeout(Duration::from_millis(100));
        assert!(matches!(c.call("slow", None), Err(ClientError::Timeout)));
        assert_eq!(call(h.path(), "notstatus", None, Duration::from_secs(5)).unwrap(), json!(5));
        h.stop();
        assert!(matches!(Client::connect("/nonexistent-tc.sock", Duration::from_secs(1)), Err(ClientError::Io(_))));
    }

    #[test]
    fn closed_and_garbage_responses() {
        use std::os::unix::net::UnixListener;
        let path = std::env::temp_dir().join(format!("tcrpc-fake-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            for reply in [&b""[..], b"{\"id\":1,\"nope\":2}", b"}", b"{\"jsonrpc\":\"2.0\",\"id\":99,\"result\":1}"] {
                let (mut s, _) = l.accept().unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b);
                s.write_all(reply).unwrap();
            }
        });
        let mut outcomes = Vec::new();
        for _ in 0..4 {
            let mut c = Client::connect(&path, Duration::from_secs(5)).unwrap();
            outcomes.push(c.call("m", None));
        }
        t.join().unwrap();
        assert!(matches!(outcomes[0], Err(ClientError::Closed)));
        assert!(matches!(outcomes[1], Err(ClientError::Protocol(_))));
        assert!(matches!(outcomes[2], Err(ClientError::Protocol(_))));
        assert!(matches!(&outcomes[3], Err(ClientError::Protocol(m)) if m.contains("does not match")));
        let _ = std::fs::remove_file(&path);
    }
}
