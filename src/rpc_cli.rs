//! `tiercache rpc`: one JSON-RPC call from the command line, printed like SPDK's rpc.py.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};
use tiercache_jsonrpc::client::{self, Client, ClientError, WaitOptions};

/// Options of `tiercache rpc`.
#[derive(clap::Args, Debug)]
pub struct RpcArgs {
    /// The daemon's JSON-RPC socket.
    #[arg(short = 's', long = "socket", value_name = "SOCKET", default_value = tiercache_jsonrpc::server::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,
    /// Seconds to wait for each response.
    #[arg(short = 't', long = "timeout", value_name = "SECONDS", default_value_t = 60.0)]
    timeout: f64,
    /// For long operations (bdev_cache_flush_start, bdev_cache_detach): poll the status
    /// method and show progress until done.
    #[arg(long)]
    wait: bool,
    /// METHOD, then its params: one JSON object, or `--key value` pairs (`--num-blocks 8`
    /// becomes "num_blocks": 8).
    #[arg(value_name = "METHOD [PARAMS]", required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    words: Vec<String>,
}

/// The status method polled by `--wait` after `method`, if it has one.
fn status_method(method: &str) -> Option<&'static str> {
    match method {
        "bdev_cache_flush_start" | "bdev_cache_detach" => Some("bdev_cache_flush_status"),
        _ => None,
    }
}

pub fn run(mut args: RpcArgs) -> ExitCode {
    // `--wait` is accepted after the method too (no method has a "wait" parameter).
    let before = args.words.len();
    args.words.retain(|w| w != "--wait");
    args.wait |= args.words.len() != before;
    let (method, params) = match client::parse_cli(&args.words) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("tiercache rpc: {e}");
            return ExitCode::from(2);
        }
    };
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        eprintln!("tiercache rpc: --timeout must be a positive number of seconds");
        return ExitCode::from(2);
    }
    let timeout = Duration::from_secs_f64(args.timeout.min(1e9));
    let status = match (args.wait, status_method(&method)) {
        (true, None) => {
            eprintln!("tiercache rpc: --wait only applies to bdev_cache_flush_start and bdev_cache_detach");
            return ExitCode::from(2);
        }
        (true, Some(s)) => Some(s),
        (false, _) => None,
    };
    let mut c = match Client::connect(&args.socket, timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tiercache rpc: cannot connect to {}: {e}", args.socket.display());
            return exit(&e);
        }
    };
    let result = match c.call(&method, params.clone()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{}", client::format_error(&method, params.as_ref(), &e));
            return exit(&e);
        }
    };
    let Some(status) = status else {
        let out = client::format_result(&result);
        if !out.is_empty() {
            println!("{out}");
        }
        return ExitCode::SUCCESS;
    };
    let name = params.as_ref().and_then(|p| p.get("name")).cloned().unwrap_or(Value::Null);
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let opts = WaitOptions { interval: Duration::from_millis(200), timeout: None };
    let r = c.wait_until_done_with(status, Some(json!({ "name": name })), opts, |st| {
        let line = client::progress_line(st);
        if line != last {
            if tty {
                eprint!("\r{line:<60}");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
            last = line;
        }
    });
    if tty {
        eprintln!();
    }
    match r {
        Ok(_) => {
            let out = client::format_result(&result);
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", client::format_error(status, Some(&json!({ "name": name })), &e));
            exit(&e)
        }
    }
}

fn exit(e: &ClientError) -> ExitCode {
    ExitCode::from(u8::try_from(e.exit_code().clamp(1, 255)).unwrap_or(1))
}
