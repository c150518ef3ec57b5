//! tiercache-jsonrpc: the JSON-RPC 2.0 management plane of tiercache.
//!
//! Compatible with SPDK's conventions: the wire is a plain stream of JSON
//! values on a Unix socket (no length prefix, no delimiter), parameters are
//! passed by name, application errors carry `-errno` as their code, and the
//! configuration document is SPDK's `save_config` / `--json` format.
//!
//! This crate does not know the engine: method implementations are plugged
//! in through [`registry::Registry`].
//!
//! * [`wire`]: incremental, bounded stream decoder and response encoding.
//! * [`protocol`]: request / response / error types and codes.
//! * [`schema`]: one set of parameter types for RPC params and config entries.
//! * [`registry`]: method registry and dispatch (single, batch, notification).
//! * [`config`]: config document parsing, replay and `save_config` assembly.
//! * [`server`]: Unix-socket server on std threads.
//! * [`client`]: blocking client and CLI helpers used by `tiercache rpc`.

pub mod client;
pub mod config;
pub mod protocol;
pub mod registry;
pub mod schema;
pub mod server;
pub mod wire;

pub use protocol::{Id, ParamError, Request, Response, RpcError};
pub use registry::{Handler, HandlerFuture, Registry};
pub use schema::Validate;
pub use server::{ServerConfig, ServerHandle};
