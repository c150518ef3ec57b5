//! Method registry and dispatch.
//!
//! Handlers are async (`BoxFuture`) so implementations can hop onto a
//! reactor and complete later; the server drives them with
//! `futures::executor::block_on` on the connection thread. Methods can be
//! registered at any time, also while the server runs.

use crate::protocol::{Id, Request, Response, RpcError};
use crate::schema::{decode_params, RpcGetMethodsParams, Validate};
use futures::future::{self, BoxFuture, FutureExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock, Weak};

/// What a handler returns.
pub type HandlerFuture = BoxFuture<'static, Result<Value, RpcError>>;

/// A method implementation: raw params in, result or error out.
pub type Handler = Arc<dyn Fn(Option<Value>) -> HandlerFuture + Send + Sync>;

/// The method table.
pub struct Registry {
    methods: RwLock<BTreeMap<String, Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("methods", &self.methods()).finish()
    }
}

impl Registry {
    /// A registry holding the builtin `rpc_get_methods`.
    pub fn new() -> Arc<Registry> {
        let reg = Arc::new(Registry { methods: RwLock::new(BTreeMap::new()) });
        let weak: Weak<Registry> = Arc::downgrade(&reg);
        // Cannot fail: the table is empty.
        let _ = reg.register_typed("rpc_get_methods", move |_p: RpcGetMethodsParams| {
            let list = weak.upgrade().map(|r| r.methods()).unwrap_or_default();
            async move { Ok(list) }
        });
        reg
    }

    /// Registers `handler` under `name`; `-EEXIST` if the name is taken.
    pub fn register(&self, name: &str, handler: Handler) -> Result<(), RpcError> {
        let mut m = self.methods.write().unwrap_or_else(|e| e.into_inner());
        if m.contains_key(name) {
            return Err(RpcError::exists(format!("method {name} already registered")));
        }
        m.insert(name.to_string(), handler);
        Ok(())
    }

    /// Registers an async closure taking raw params.
    pub fn register_fn<F, Fut>(&self, name: &str, f: F) -> Result<(), RpcError>
    where
        F: Fn(Option<Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, RpcError>> + Send + 'static,
    {
        self.register(name, Arc::new(move |p| f(p).boxed()))
    }

    /// Registers a typed handler: params are decoded into `P` and validated
    /// (errors become -32602 naming the field) before `f` runs; the result
    /// is serialized to JSON.
    pub fn register_typed<P, R, F, Fut>(&self, name: &str, f: F) -> Result<(), RpcError>
    where
        P: DeserializeOwned + Validate + Send + 'static,
        R: Serialize + 'static,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
    {
        self.register(name, typed_handler(f))
    }

    /// Removes a method; true if it existed.
    pub fn unregister(&self, name: &str) -> bool {
        let mut m = self.methods.write().unwrap_or_else(|e| e.into_inner());
        m.remove(name).is_some()
    }

    /// True if `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        let m = self.methods.read().unwrap_or_else(|e| e.into_inner());
        m.contains_key(name)
    }

    /// Sorted method names.
    pub fn methods(&self) -> Vec<String> {
        let m = self.methods.read().unwrap_or_else(|e| e.into_inner());
        m.keys().cloned().collect()
    }

    /// Calls a method directly (config replay, tests). Panicking handlers
    /// become -32603.
    pub async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let handler = {
            let m = self.methods.read().unwrap_or_else(|e| e.into_inner());
            m.get(method).cloned()
        };
        let Some(handler) = handler else {
            return Err(RpcError::method_not_found(method));
        };
        let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(params))) {
            Ok(fut) => fut,
            Err(_) => return Err(panicked(method)),
        };
        match AssertUnwindSafe(fut).catch_unwind().await {
            Ok(r) => r,
            Err(_) => Err(panicked(method)),
        }
    }

    /// Handles one request; `None` for a notification.
    pub async fn handle(&self, req: Request) -> Option<Response> {
        let outcome = self.call(&req.method, req.params).await;
        if let Err(e) = &outcome {
            log::debug!("rpc {} failed: {e}", req.method);
        }
        req.id.map(|id| Response { id, outcome })
    }

    /// Handles a batch in order; the responses of its requests and of its
    /// invalid members (notifications produce none).
    pub async fn handle_batch(&self, items: Vec<Result<Request, Response>>) -> Vec<Response> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Ok(req) => {
                    if let Some(r) = self.handle(req).await {
                        out.push(r);
                    }
                }
                Err(resp) => out.push(resp),
            }
        }
        out
    }

    /// Handles a request given as a JSON value (convenience for tests and
    /// in-process callers).
    pub async fn handle_value(&self, v: Value) -> Option<Value> {
        match crate::wire::classify(v) {
            crate::wire::Incoming::Single(r) => self.handle(r).await.map(|r| r.to_value()),
            crate::wire::Incoming::Batch(items) => {
                let rs = self.handle_batch(items).await;
                (!rs.is_empty()).then(|| Value::Array(rs.iter().map(Response::to_value).collect()))
            }
            crate::wire::Incoming::Invalid(r) | crate::wire::Incoming::Fatal(r) => Some(r.to_value()),
        }
    }
}

fn panicked(method: &str) -> RpcError {
    log::error!("rpc handler for {method} panicked");
    RpcError::internal(format!("handler for {method} panicked"))
}

/// Wraps a typed closure into a raw [`Handler`].
pub fn typed_handler<P, R, F, Fut>(f: F) -> Handler
where
    P: DeserializeOwned + Validate + Send + 'static,
    R: Serialize + 'static,
    F: Fn(P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
{
    Arc::new(move |params: Option<Value>| match decode_params::<P>(params) {
        Ok(p) => f(p)
            .map(|r| {
                r.and_then(|v| {
                    serde_json::to_value(v).map_err(|e| RpcError::internal(format!("cannot encode result: {e}")))
                })
            })
            .boxed(),
        Err(e) => future::ready(Err(RpcError::from(e))).boxed(),
    })
}

/// A response for `id` carrying `error` (helper for transports).
pub fn error_response(id: Id, error: RpcError) -> Response {
    Response::error(id, error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND};
    use crate::schema::BdevMallocCreateParams;
    use futures::executor::block_on;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn reg() -> Arc<Registry> {
        let r = Registry::new();
        r.register_fn("echo", |p| async move { Ok(p.unwrap_or(Value::Null)) }).unwrap();
        r.register_typed("bdev_malloc_create", |p: BdevMallocCreateParams| async move {
            if p.name.as_deref() == Some("malloc0") {
                return Err(RpcError::exists("bdev malloc0 already exists"));
            }
            Ok(p.name.unwrap_or_else(|| "Malloc0".into()))
        })
        .unwrap();
        r.register_fn("boom", |_| async move { panic!("boom") }).unwrap();
        r.register("boom_sync", Arc::new(|_: Option<Value>| -> HandlerFuture { panic!("sync boom") })).unwrap();
        r
    }

    fn code(v: &Value) -> i64 {
        v["error"]["code"].as_i64().unwrap()
    }

    #[test]
    fn builtin_rpc_get_methods() {
        let r = reg();
        let v = block_on(r.call("rpc_get_methods", None)).unwrap();
        let names: Vec<String> = serde_json::from_value(v).unwrap();
        assert!(names.contains(&"rpc_get_methods".to_string()));
        assert!(names.windows(2).all(|w| w[0] < w[1]));
        assert!(block_on(r.call("rpc_get_methods", Some(json!({"current":true})))).is_ok());
        let e = block_on(r.call("rpc_get_methods", Some(json!({"bogus":1})))).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
    }

    #[test]
    fn register_duplicate_and_unregister() {
        let r = reg();
        let e = r.register_fn("echo", |_| async { Ok(Value::Null) }).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EEXIST));
        assert!(r.contains("echo"));
        assert!(r.unregister("echo"));
        assert!(!r.unregister("echo"));
        assert!(!r.contains("echo"));
        assert!(format!("{r:?}").contains("rpc_get_methods"));
    }

    #[test]
    fn typed_errors() {
        let r = reg();
        let e = block_on(r.call("bdev_malloc_create", Some(json!({"nmae":"x","num_blocks":1,"block_size":512}))))
            .unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        assert!(e.message.starts_with("invalid params: unknown field \"nmae\""), "{}", e.message);
        let e = block_on(r.call("bdev_malloc_create", None)).unwrap_err();
        assert_eq!(e.message, "invalid params: missing field \"num_blocks\"");
        let e = block_on(r.call("bdev_malloc_create", Some(json!({"num_blocks":0,"block_size":512})))).unwrap_err();
        assert_eq!(e.message, "invalid params: num_blocks: must be > 0");
        let e = block_on(r.call("bdev_malloc_create", Some(json!({"name":"malloc0","num_blocks":1,"block_size":512}))))
            .unwrap_err();
        assert_eq!((e.code, e.errno()), (-17, Some(17)));
        assert_eq!(e.message, "bdev malloc0 already exists");
        let ok = block_on(r.call("bdev_malloc_create", Some(json!({"num_blocks":1,"block_size":512}))));
        assert_eq!(ok, Ok(json!("Malloc0")));
    }

    #[test]
    fn unknown_method_and_panics() {
        let r = reg();
        assert_eq!(block_on(r.call("nope", None)).unwrap_err().code, METHOD_NOT_FOUND);
        assert_eq!(block_on(r.call("boom", None)).unwrap_err().code, INTERNAL_ERROR);
        assert_eq!(block_on(r.call("boom_sync", None)).unwrap_err().code, INTERNAL_ERROR);
        // the registry still works after a panic
        assert!(block_on(r.call("echo", None)).is_ok());
    }

    #[test]
    fn unserializable_result_is_internal_error() {
        let r = Registry::new();
        let mut m = std::collections::HashMap::new();
        m.insert(vec![1u8], 1);
        r.register_typed("bad", move |_: Value| {
            let m = m.clone();
            async move { Ok(m) }
        })
        .unwrap();
        assert_eq!(block_on(r.call("bad", None)).unwrap_err().code, INTERNAL_ERROR);
    }

    #[test]
    fn dispatch_single_notification_batch() {
        let r = reg();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        r.register_fn("count", move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok(json!(null)) }
        })
        .unwrap();
        let v = block_on(r.handle_value(json!({"jsonrpc":"2.0","method":"echo","params":[1],"id":1}))).unwrap();
        assert_eq!(v, json!({"jsonrpc":"2.0","id":1,"result":[1]}));
        assert_eq!(block_on(r.handle_value(json!({"jsonrpc":"2.0","method":"count"}))), None);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // notification of an unknown method: still no response
        assert_eq!(block_on(r.handle_value(json!({"jsonrpc":"2.0","method":"zz"}))), None);
        let v = block_on(r.handle_value(json!([
            {"jsonrpc":"2.0","method":"echo","params":{"a":1},"id":"a"},
            {"jsonrpc":"2.0","method":"count"},
            {"jsonrpc":"2.0","method":"nope","id":2},
            3
        ])))
        .unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0]["result"], json!({"a":1}));
        assert_eq!(code(&a[1]), METHOD_NOT_FOUND as i64);
        assert_eq!(code(&a[2]), INVALID_REQUEST as i64);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // all-notification batch: nothing
        assert_eq!(block_on(r.handle_value(json!([{"jsonrpc":"2.0","method":"count"}]))), None);
        let v = block_on(r.handle_value(json!([]))).unwrap();
        assert_eq!(code(&v), INVALID_REQUEST as i64);
        let v = block_on(r.handle_value(json!("x"))).unwrap();
        assert_eq!(code(&v), INVALID_REQUEST as i64);
        let e = error_response(Id::Null, RpcError::internal("x"));
        assert!(e.outcome.is_err());
    }
}
