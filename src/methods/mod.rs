//! The JSON-RPC methods of the daemon, by subsystem. Every method of
//! `tiercache_jsonrpc::schema::METHODS` is registered; those the engine cannot back yet
//! answer `-EOPNOTSUPP` with a message saying so.

pub mod bdev;
pub mod cache;
pub mod framework;
pub mod nbd;

use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use tiercache_jsonrpc::schema::{decode_params, Validate};
use tiercache_jsonrpc::RpcError;

use crate::target::Target;

/// Registers every method and the config subsystems.
pub fn register_all(t: &Arc<Target>) -> Result<(), RpcError> {
    framework::register(t)?;
    bdev::register(t)?;
    cache::register(t)?;
    nbd::register(t)?;
    framework::register_config(t)?;
    let missing: Vec<&str> =
        tiercache_jsonrpc::schema::METHODS.iter().map(|(m, _)| *m).filter(|m| !t.registry.contains(m)).collect();
    if !missing.is_empty() {
        return Err(RpcError::internal(format!("methods without a handler: {}", missing.join(", "))));
    }
    Ok(())
}

/// Registers a typed handler that receives the target.
pub fn reg<P, R, F, Fut>(t: &Arc<Target>, name: &str, f: F) -> Result<(), RpcError>
where
    P: DeserializeOwned + Validate + Send + 'static,
    R: Serialize + 'static,
    F: Fn(Arc<Target>, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
{
    let me = t.clone();
    t.registry.register_typed(name, move |p: P| f(me.clone(), p))
}

/// Like [`reg`], but `pre` first sees the raw params object and may remove keys that
/// SPDK's rpc.py always sends and that tiercache's schema does not define (or refuse
/// them with an error).
pub fn reg_pre<P, R, F, Fut>(
    t: &Arc<Target>,
    name: &str,
    pre: fn(&mut Map<String, Value>) -> Result<(), RpcError>,
    f: F,
) -> Result<(), RpcError>
where
    P: DeserializeOwned + Validate + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(Arc<Target>, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
{
    let me = t.clone();
    let f = Arc::new(f);
    t.registry.register_fn(name, move |params: Option<Value>| {
        let me = me.clone();
        let f = f.clone();
        async move {
            let params = match params {
                Some(Value::Object(mut o)) => {
                    pre(&mut o)?;
                    Some(Value::Object(o))
                }
                other => other,
            };
            let p: P = decode_params(params).map_err(RpcError::from)?;
            let r = f(me, p).await?;
            serde_json::to_value(r).map_err(|e| RpcError::internal(format!("cannot encode result: {e}")))
        }
    })
}

/// `-EOPNOTSUPP` for a feature the engine does not have yet.
pub fn not_supported(what: impl std::fmt::Display) -> RpcError {
    RpcError::from_errno(libc::EOPNOTSUPP, format!("{what}: not supported by the cache engine yet"))
}
