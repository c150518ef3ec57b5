//! `tiercache`: the daemon (`tiercache serve`) and its management client (`tiercache rpc`).
//!
//! ```text
//! tiercache serve [--config FILE] [--data-dir DIR] [--cores LIST] [--rpc-socket PATH]
//!                 [--nbd-listen ADDR ...] [--busy-poll] [--log-level LEVEL]
//! tiercache rpc [-s SOCKET] [-t TIMEOUT] [--wait] METHOD [JSON | --key value ...]
//! ```

mod defaults;
mod methods;
mod nbd_glue;
mod rpc_cli;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A userspace block-storage cache: pinned polling reactors, a log-structured write-back
/// cache, an NBD server and SPDK-compatible JSON-RPC management.
#[derive(Parser, Debug)]
#[command(name = "tiercache", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Call a JSON-RPC method of a running daemon.
    Rpc(rpc_cli::RpcArgs),
}

/// Options of `tiercache serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// SPDK-style JSON config (`{"subsystems":[...]}`) replayed at start. Without it, the
    /// built-in default (configs/default.json) runs over files in --data-dir.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of the default configuration's files (backing.img, cache.img, nbd.sock).
    #[arg(long, value_name = "DIR", default_value = "./tiercache-data")]
    pub data_dir: PathBuf,
    /// Reactor cores, e.g. "0", "0-3", "0,2". Default: every available core.
    #[arg(long, value_name = "LIST")]
    pub cores: Option<String>,
    /// JSON-RPC Unix socket.
    #[arg(long, value_name = "PATH", default_value = tiercache_jsonrpc::server::DEFAULT_SOCKET_PATH)]
    pub rpc_socket: PathBuf,
    /// NBD listen address ("unix:/path" or "host:port"); repeatable. With the default
    /// configuration it replaces the default addresses; with --config it adds listeners.
    #[arg(long = "nbd-listen", value_name = "ADDR")]
    pub nbd_listen: Vec<String>,
    /// Reactors never sleep in the kernel (lowest latency, 100% CPU per core).
    #[arg(long)]
    pub busy_poll: bool,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logging(&args.log_level);
            match target::serve(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    eprintln!("tiercache: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Rpc(args) => rpc_cli::run(args),
    }
}

fn init_logging(level: &str) {
    let env = env_logger::Env::default().default_filter_or(level);
    env_logger::Builder::from_env(env).format_timestamp_millis().init();
}
