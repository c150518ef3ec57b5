//! The configuration document (SPDK `--json` / `save_config` format):
//!
//! ```json
//! {"subsystems":[
//!   {"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{...}}]},
//!   {"subsystem":"nbd","config":[...]}]}
//! ```
//!
//! Parsing checks the structure and, for every method the schema knows, the
//! params (same types as the RPCs); errors say which subsystem, entry index
//! and method failed. Replay calls the entries in order through the
//! [`Registry`]. [`ConfigAssembler`] builds the document back: each
//! subsystem contributes its list of calls.

use crate::protocol::{json_type_name, ParamError, RpcError};
use crate::registry::Registry;
use crate::schema::{self, decode_params, FrameworkGetConfigParams, NoParams, SaveConfigParams};
use futures::future::{BoxFuture, FutureExt};
use serde::Serialize;
use serde_json::{Map, Value};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};

/// One call: `{"method": ..., "params": {...}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigEntry {
    /// Method name.
    pub method: String,
    /// Params (absent when the method takes none).
    pub params: Option<Value>,
}

impl ConfigEntry {
    /// An entry from a method name and any serializable params type (the
    /// schema types serialize to exactly what they accept).
    pub fn new(method: &str, params: &impl Serialize) -> Result<ConfigEntry, RpcError> {
        let params = serde_json::to_value(params)
            .map_err(|e| RpcError::internal(format!("cannot encode {method} params: {e}")))?;
        Ok(ConfigEntry { method: method.to_string(), params: Some(params) })
    }

    /// An entry without params.
    pub fn without_params(method: &str) -> ConfigEntry {
        ConfigEntry { method: method.to_string(), params: None }
    }

    /// The entry as JSON.
    pub fn to_value(&self) -> Value {
        let mut o = Map::new();
        o.insert("method".into(), Value::String(self.method.clone()));
        if let Some(p) = &self.params {
            o.insert("params".into(), p.clone());
        }
        Value::Object(o)
    }
}

/// The config list of one subsystem.
#[derive(Debug, Clone, PartialEq)]
pub struct SubsystemConfig {
    /// Subsystem name (`bdev`, `nbd`).
    pub subsystem: String,
    /// Calls, in replay order.
    pub config: Vec<ConfigEntry>,
}

/// A whole config document.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfigDocument {
    /// Subsystems, in replay order.
    pub subsystems: Vec<SubsystemConfig>,
}

/// What went wrong, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Subsystem concerned, if known.
    pub subsystem: Option<String>,
    /// Index of the entry in its subsystem's `config` list.
    pub index: Option<usize>,
    /// Method of the entry, if known.
    pub method: Option<String>,
    /// The failure (boxed to keep `Result`s small).
    pub kind: Box<ConfigErrorKind>,
}

/// Kinds of [`ConfigError`].
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigErrorKind {
    /// Not JSON.
    Json(String),
    /// JSON of the wrong shape.
    Structure(String),
    /// Params rejected by the schema.
    Params(ParamError),
    /// The call failed during replay (errno kept).
    Call(RpcError),
}

impl ConfigError {
    fn at(subsystem: Option<&str>, index: Option<usize>, method: Option<&str>, kind: ConfigErrorKind) -> Self {
        ConfigError {
            subsystem: subsystem.map(str::to_string),
            index,
            method: method.map(str::to_string),
            kind: Box::new(kind),
        }
    }

    fn structure(subsystem: Option<&str>, index: Option<usize>, msg: impl Into<String>) -> Self {
        Self::at(subsystem, index, None, ConfigErrorKind::Structure(msg.into()))
    }

    /// The error as an RPC error: a failed call keeps its code (and errno),
    /// bad params are -32602, anything else `-EINVAL`; the message says where.
    pub fn to_rpc_error(&self) -> RpcError {
        let code = match &*self.kind {
            ConfigErrorKind::Call(e) => e.code,
            ConfigErrorKind::Params(_) => crate::protocol::INVALID_PARAMS,
            _ => -libc::EINVAL,
        };
        RpcError::new(code, self.to_string())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("config")?;
        if let Some(s) = &self.subsystem {
            write!(f, " subsystem \"{s}\"")?;
        }
        if let Some(i) = self.index {
            write!(f, " entry #{i}")?;
        }
        if let Some(m) = &self.method {
            write!(f, " ({m})")?;
        }
        match &*self.kind {
            ConfigErrorKind::Json(m) => write!(f, ": invalid JSON: {m}"),
            ConfigErrorKind::Structure(m) => write!(f, ": {m}"),
            ConfigErrorKind::Params(e) => write!(f, ": invalid params: {e}"),
            ConfigErrorKind::Call(e) => write!(f, ": {} (code {})", e.message, e.code),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigDocument {
    /// Parses a document from text.
    pub fn parse(text: &str) -> Result<ConfigDocument, ConfigError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::at(None, None, None, ConfigErrorKind::Json(e.to_string())))?;
        Self::from_value(&v)
    }

    /// Parses a document from JSON, checking the params of every method the
    /// schema knows. Methods unknown to the schema are kept (they may be
    /// registered by an extension); [`replay`](Self::replay) checks them.
    pub fn from_value(v: &Value) -> Result<ConfigDocument, ConfigError> {
        let root = v.as_object().ok_or_else(|| {
            ConfigError::structure(None, None, format!("document must be an object, got {}", json_type_name(v)))
        })?;
        if let Some(k) = root.keys().find(|k| *k != "subsystems") {
            return Err(ConfigError::structure(None, None, format!("unknown key \"{k}\", expected \"subsystems\"")));
        }
        let subs = match root.get("subsystems") {
            Some(Value::Array(a)) => a,
            Some(other) => {
                return Err(ConfigError::structure(
                    None,
                    None,
                    format!("\"subsystems\" must be an array, got {}", json_type_name(other)),
                ))
            }
            None => return Err(ConfigError::structure(None, None, "missing \"subsystems\"")),
        };
        let mut doc = ConfigDocument::default();
        for (si, s) in subs.iter().enumerate() {
            let so = s.as_object().ok_or_else(|| {
                ConfigError::structure(
                    None,
                    None,
                    format!("subsystems[{si}] must be an object, got {}", json_type_name(s)),
                )
            })?;
            let name = match so.get("subsystem") {
                Some(Value::String(n)) if !n.is_empty() => n.clone(),
                _ => {
                    return Err(ConfigError::structure(
                        None,
                        None,
                        format!("subsystems[{si}] needs a non-empty string \"subsystem\""),
                    ))
                }
            };
            let sn = Some(name.as_str());
            if let Some(k) = so.keys().find(|k| *k != "subsystem" && *k != "config") {
                return Err(ConfigError::structure(sn, None, format!("unknown key \"{k}\"")));
            }
            if doc.subsystems.iter().any(|x| x.subsystem == name) {
                return Err(ConfigError::structure(sn, None, "subsystem listed twice"));
            }
            let entries: &[Value] = match so.get("config") {
                None | Some(Value::Null) => &[],
                Some(Value::Array(a)) => a,
                Some(other) => {
                    return Err(ConfigError::structure(
                        sn,
                        None,
                        format!("\"config\" must be an array or null, got {}", json_type_name(other)),
                    ))
                }
            };
            let mut config = Vec::with_capacity(entries.len());
            for (i, e) in entries.iter().enumerate() {
                config.push(parse_entry(&name, i, e)?);
            }
            doc.subsystems.push(SubsystemConfig { subsystem: name, config });
        }
        Ok(doc)
    }

    /// The document as JSON (`"config": []` for empty subsystems).
    pub fn to_value(&self) -> Value {
        let subs = self
            .subsystems
            .iter()
            .map(|s| {
                let mut o = Map::new();
                o.insert("subsystem".into(), Value::String(s.subsystem.clone()));
                o.insert("config".into(), Value::Array(s.config.iter().map(ConfigEntry::to_value).collect()));
                Value::Object(o)
            })
            .collect();
        let mut root = Map::new();
        root.insert("subsystems".into(), Value::Array(subs));
        Value::Object(root)
    }

    /// Pretty-printed JSON (2-space indent, like rpc.py).
    pub fn to_string_pretty(&self) -> String {
        serde_json::to_string_pretty(&self.to_value()).unwrap_or_default()
    }

    /// Number of entries in all subsystems.
    pub fn len(&self) -> usize {
        self.subsystems.iter().map(|s| s.config.len()).sum()
    }

    /// True when there is no entry at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that every method is registered, before anything runs.
    pub fn check_methods(&self, registry: &Registry) -> Result<(), ConfigError> {
        for s in &self.subsystems {
            for (i, e) in s.config.iter().enumerate() {
                if !registry.contains(&e.method) {
                    return Err(ConfigError::at(
                        Some(&s.subsystem),
                        Some(i),
                        Some(&e.method),
                        ConfigErrorKind::Call(RpcError::method_not_found(&e.method)),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Replays every entry in order; stops at the first failure. Returns the
    /// number of calls made.
    pub async fn replay(&self, registry: &Registry) -> Result<usize, ConfigError> {
        self.check_methods(registry)?;
        let mut n = 0;
        for s in &self.subsystems {
            for (i, e) in s.config.iter().enumerate() {
                log::info!("config: {} #{i}: {}", s.subsystem, e.method);
                registry.call(&e.method, e.params.clone()).await.map_err(|err| {
                    ConfigError::at(Some(&s.subsystem), Some(i), Some(&e.method), ConfigErrorKind::Call(err))
                })?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// [`replay`](Self::replay) on the current thread (not on a reactor).
    pub fn replay_blocking(&self, registry: &Registry) -> Result<usize, ConfigError> {
        futures::executor::block_on(self.replay(registry))
    }
}

fn parse_entry(subsystem: &str, i: usize, e: &Value) -> Result<ConfigEntry, ConfigError> {
    let sn = Some(subsystem);
    let eo = e.as_object().ok_or_else(|| {
        ConfigError::structure(sn, Some(i), format!("entry must be an object, got {}", json_type_name(e)))
    })?;
    let method = match eo.get("method") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(ConfigError::structure(sn, Some(i), "entry needs a non-empty string \"method\"")),
    };
    let mn = Some(method.as_str());
    if let Some(k) = eo.keys().find(|k| *k != "method" && *k != "params") {
        return Err(ConfigError::at(sn, Some(i), mn, ConfigErrorKind::Structure(format!("unknown key \"{k}\""))));
    }
    let params = match eo.get("params") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(other) => {
            return Err(ConfigError::at(
                sn,
                Some(i),
                mn,
                ConfigErrorKind::Params(ParamError::Decode(format!(
                    "params must be an object, got {}",
                    json_type_name(other)
                ))),
            ))
        }
    };
    if let Some(Err(pe)) = schema::check_params(&method, params.as_ref()) {
        return Err(ConfigError::at(sn, Some(i), mn, ConfigErrorKind::Params(pe)));
    }
    Ok(ConfigEntry { method, params })
}

/// Produces the current config list of one subsystem.
pub type SubsystemConfigFn = Arc<dyn Fn() -> BoxFuture<'static, Result<Vec<ConfigEntry>, RpcError>> + Send + Sync>;

struct Source {
    name: String,
    depends_on: Vec<String>,
    f: SubsystemConfigFn,
}

/// Assembles `save_config` / `framework_get_config` answers from the
/// subsystems' contributions. Subsystems are kept in registration order; a
/// subsystem may only depend on subsystems registered before it, so that
/// order is a valid replay order.
#[derive(Default)]
pub struct ConfigAssembler {
    sources: RwLock<Vec<Source>>,
}

impl fmt::Debug for ConfigAssembler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigAssembler").field("subsystems", &self.subsystem_names()).finish()
    }
}

impl ConfigAssembler {
    /// An empty assembler.
    pub fn new() -> Arc<ConfigAssembler> {
        Arc::new(ConfigAssembler::default())
    }

    /// Adds a subsystem. `-EEXIST` if already added, `-ENOENT` if a
    /// dependency is not added yet.
    pub fn add_subsystem(&self, name: &str, depends_on: &[&str], f: SubsystemConfigFn) -> Result<(), RpcError> {
        let mut s = self.sources.write().unwrap_or_else(|e| e.into_inner());
        if s.iter().any(|x| x.name == name) {
            return Err(RpcError::exists(format!("subsystem {name} already exists")));
        }
        if let Some(d) = depends_on.iter().find(|d| !s.iter().any(|x| x.name == **d)) {
            return Err(RpcError::from_errno(
                libc::ENOENT,
                format!("subsystem {name} depends on unknown subsystem {d}"),
            ));
        }
        s.push(Source { name: name.to_string(), depends_on: depends_on.iter().map(|d| d.to_string()).collect(), f });
        Ok(())
    }

    /// [`add_subsystem`](Self::add_subsystem) with an async closure.
    pub fn add_subsystem_fn<F, Fut>(&self, name: &str, depends_on: &[&str], f: F) -> Result<(), RpcError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<ConfigEntry>, RpcError>> + Send + 'static,
    {
        self.add_subsystem(name, depends_on, Arc::new(move || f().boxed()))
    }

    /// Subsystem names in order.
    pub fn subsystem_names(&self) -> Vec<String> {
        let s = self.sources.read().unwrap_or_else(|e| e.into_inner());
        s.iter().map(|x| x.name.clone()).collect()
    }

    /// `framework_get_subsystems` result (SPDK shape):
    /// `[{"subsystem": "bdev", "depends_on": []}, ...]`.
    pub fn subsystems_value(&self) -> Value {
        let s = self.sources.read().unwrap_or_else(|e| e.into_inner());
        Value::Array(s.iter().map(|x| serde_json::json!({"subsystem": x.name, "depends_on": x.depends_on})).collect())
    }

    fn source(&self, name: &str) -> Option<SubsystemConfigFn> {
        let s = self.sources.read().unwrap_or_else(|e| e.into_inner());
        s.iter().find(|x| x.name == name).map(|x| x.f.clone())
    }

    /// One subsystem's config list; `-ENODEV` for an unknown subsystem.
    pub async fn subsystem_config(&self, name: &str) -> Result<Vec<ConfigEntry>, RpcError> {
        let f = self.source(name).ok_or_else(|| RpcError::no_device(format!("subsystem {name} not found")))?;
        f().await
    }

    /// The whole document, optionally restricted to some subsystems
    /// (`-ENODEV` if the filter names an unknown one).
    pub async fn assemble(&self, only: Option<&[String]>) -> Result<ConfigDocument, RpcError> {
        let names = self.subsystem_names();
        if let Some(only) = only {
            if let Some(bad) = only.iter().find(|n| !names.contains(n)) {
                return Err(RpcError::no_device(format!("subsystem {bad} not found")));
            }
        }
        let mut doc = ConfigDocument::default();
        for name in names {
            if only.is_some_and(|o| !o.contains(&name)) {
                continue;
            }
            let config = self.subsystem_config(&name).await?;
            doc.subsystems.push(SubsystemConfig { subsystem: name, config });
        }
        Ok(doc)
    }

    /// Registers `framework_get_subsystems`, `framework_get_config` and
    /// `save_config` on `registry`.
    pub fn register_methods(self: &Arc<Self>, registry: &Registry) -> Result<(), RpcError> {
        let me = self.clone();
        registry.register_typed("framework_get_subsystems", move |_: NoParams| {
            let v = me.subsystems_value();
            async move { Ok(v) }
        })?;
        let me = self.clone();
        registry.register_typed("framework_get_config", move |p: FrameworkGetConfigParams| {
            let me = me.clone();
            async move {
                let entries = me.subsystem_config(&p.name).await?;
                Ok(Value::Array(entries.iter().map(ConfigEntry::to_value).collect()))
            }
        })?;
        let me = self.clone();
        registry.register_typed("save_config", move |p: SaveConfigParams| {
            let me = me.clone();
            async move { Ok(me.assemble(p.subsystems.as_deref()).await?.to_value()) }
        })?;
        Ok(())
    }
}

/// Decodes a config entry's params with the schema types (for subsystems
/// that want typed access during replay outside the registry).
pub fn entry_params<P: serde::de::DeserializeOwned + schema::Validate>(e: &ConfigEntry) -> Result<P, ParamError> {
    decode_params(e.params.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{INVALID_PARAMS, METHOD_NOT_FOUND};
    use crate::schema::{BdevMallocCreateParams, NbdExportAddParams};
    use futures::executor::block_on;
    use serde_json::json;
    use std::sync::Mutex;

    const DOC: &str = r#"{"subsystems":[
        {"subsystem":"bdev","config":[
            {"method":"bdev_malloc_create","params":{"name":"m0","num_blocks":64,"block_size":512}},
            {"method":"bdev_malloc_create","params":{"name":"m1","num_blocks":64,"block_size":512}}]},
        {"subsystem":"nbd","config":[
            {"method":"nbd_server_start","params":{"listen":"unix:/tmp/nbd.sock"}},
            {"method":"nbd_export_add","params":{"bdev_name":"m0"}}]},
        {"subsystem":"empty","config":null}]}"#;

    fn err(text: &str) -> ConfigError {
        ConfigDocument::parse(text).unwrap_err()
    }

    #[test]
    fn parses_and_roundtrips() {
        let d = ConfigDocument::parse(DOC).unwrap();
        assert_eq!(d.subsystems.len(), 3);
        assert_eq!(d.len(), 4);
        assert!(!d.is_empty());
        assert_eq!(d.subsystems[1].config[1].method, "nbd_export_add");
        let again = ConfigDocument::parse(&d.to_string_pretty()).unwrap();
        assert_eq!(again, d);
        assert_eq!(d.to_value()["subsystems"][2]["config"], json!([]));
        let p: NbdExportAddParams = entry_params(&d.subsystems[1].config[1]).unwrap();
        assert_eq!(p.bdev_name, "m0");
    }

    #[test]
    fn structural_errors_say_where() {
        assert!(matches!(*err("{").kind, ConfigErrorKind::Json(_)));
        assert!(err("[]").to_string().contains("must be an object"));
        assert!(err("{}").to_string().contains("missing \"subsystems\""));
        assert!(err(r#"{"subsystems":1}"#).to_string().contains("must be an array"));
        assert!(err(r#"{"subsystems":[],"x":1}"#).to_string().contains("unknown key \"x\""));
        assert!(err(r#"{"subsystems":[1]}"#).to_string().contains("subsystems[0]"));
        assert!(err(r#"{"subsystems":[{"config":[]}]}"#).to_string().contains("\"subsystem\""));
        let e = err(r#"{"subsystems":[{"subsystem":"bdev","config":{}}]}"#);
        assert_eq!(e.subsystem.as_deref(), Some("bdev"));
        let e = err(r#"{"subsystems":[{"subsystem":"bdev","cfg":[]}]}"#);
        assert!(e.to_string().contains("unknown key \"cfg\""));
        let e = err(r#"{"subsystems":[{"subsystem":"a"},{"subsystem":"a"}]}"#);
        assert!(e.to_string().contains("twice"));
        let e = err(r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"x"},5]}]}"#);
        assert_eq!((e.index, e.subsystem.as_deref()), (Some(1), Some("bdev")));
        let e = err(r#"{"subsystems":[{"subsystem":"bdev","config":[{"params":{}}]}]}"#);
        assert!(e.to_string().contains("\"method\""));
        let e = err(r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"m","x":1}]}]}"#);
        assert_eq!(e.method.as_deref(), Some("m"));
        let e = err(r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"m","params":[1]}]}]}"#);
        assert!(matches!(*e.kind, ConfigErrorKind::Params(_)));
        assert_eq!(e.to_rpc_error().code, INVALID_PARAMS);
        assert_eq!(err("[]").to_rpc_error().code, -libc::EINVAL);
    }

    #[test]
    fn param_errors_name_subsystem_entry_method_field() {
        let e = err(r#"{"subsystems":[{"subsystem":"bdev","config":[
            {"method":"bdev_null_create","params":{"name":"n","num_blocks":1,"block_size":512}},
            {"method":"bdev_malloc_create","params":{"nmae":"m0","num_blocks":1,"block_size":512}}]}]}"#);
        let s = e.to_string();
        assert!(
            s.starts_with(
                "config subsystem \"bdev\" entry #1 (bdev_malloc_create): invalid params: unknown field \"nmae\""
            ),
            "{s}"
        );
    }

    fn registry_with_log() -> (Arc<Registry>, Arc<Mutex<Vec<String>>>) {
        let r = Registry::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        for m in ["bdev_malloc_create", "nbd_server_start", "nbd_export_add"] {
            let l = log.clone();
            let name = m.to_string();
            r.register_fn(m, move |p| {
                let l = l.clone();
                let name = name.clone();
                async move {
                    if p.as_ref().and_then(|p| p.get("name")) == Some(&json!("m1")) {
                        return Err(RpcError::exists("bdev m1 already exists"));
                    }
                    l.lock().unwrap().push(name);
                    Ok(Value::Bool(true))
                }
            })
            .unwrap();
        }
        (r, log)
    }

    #[test]
    fn replay_in_order_and_stop_at_failure() {
        let (r, log) = registry_with_log();
        let d = ConfigDocument::parse(DOC).unwrap();
        let e = d.replay_blocking(&r).unwrap_err();
        assert_eq!(e.index, Some(1));
        assert_eq!(e.method.as_deref(), Some("bdev_malloc_create"));
        assert_eq!(e.to_rpc_error().errno(), Some(libc::EEXIST));
        assert!(e.to_string().contains("bdev m1 already exists"));
        assert_eq!(log.lock().unwrap().len(), 1);

        let (r, log) = registry_with_log();
        let mut d = ConfigDocument::parse(DOC).unwrap();
        d.subsystems[0].config.remove(1);
        assert_eq!(d.replay_blocking(&r), Ok(3));
        assert_eq!(*log.lock().unwrap(), ["bdev_malloc_create", "nbd_server_start", "nbd_export_add"]);
    }

    #[test]
    fn replay_checks_all_methods_first() {
        let (r, log) = registry_with_log();
        let d = ConfigDocument::parse(
            r#"{"subsystems":[{"subsystem":"bdev","config":[
              {"method":"bdev_malloc_create","params":{"name":"m0","num_blocks":1,"block_size":512}},
              {"method":"bdev_foo_create","params":{"x":1}}]}]}"#,
        )
        .unwrap();
        let e = d.replay_blocking(&r).unwrap_err();
        assert_eq!(e.to_rpc_error().code, METHOD_NOT_FOUND);
        assert_eq!(e.index, Some(1));
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn assembler_and_methods() {
        let a = ConfigAssembler::new();
        a.add_subsystem_fn("bdev", &[], || async {
            Ok(vec![ConfigEntry::new(
                "bdev_malloc_create",
                &BdevMallocCreateParams {
                    name: Some("m0".into()),
                    num_blocks: 8,
                    block_size: 512,
                    ..Default::default()
                },
            )?])
        })
        .unwrap();
        assert_eq!(a.add_subsystem_fn("bdev", &[], || async { Ok(vec![]) }).unwrap_err().errno(), Some(libc::EEXIST));
        assert_eq!(
            a.add_subsystem_fn("x", &["nope"], || async { Ok(vec![]) }).unwrap_err().errno(),
            Some(libc::ENOENT)
        );
        a.add_subsystem_fn("nbd", &["bdev"], || async { Ok(vec![ConfigEntry::without_params("nbd_server_stop")]) })
            .unwrap();
        assert!(format!("{a:?}").contains("nbd"));
        let r = Registry::new();
        a.register_methods(&r).unwrap();
        let subs = block_on(r.call("framework_get_subsystems", None)).unwrap();
        assert_eq!(subs[1], json!({"subsystem":"nbd","depends_on":["bdev"]}));
        let cfg = block_on(r.call("framework_get_config", Some(json!({"name":"bdev"})))).unwrap();
        assert_eq!(cfg[0]["params"], json!({"name":"m0","num_blocks":8,"block_size":512}));
        let e = block_on(r.call("framework_get_config", Some(json!({"name":"zz"})))).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENODEV));
        let doc = block_on(r.call("save_config", None)).unwrap();
        let parsed = ConfigDocument::from_value(&doc).unwrap();
        assert_eq!(parsed.subsystems.len(), 2);
        assert_eq!(parsed.subsystems[1].config[0], ConfigEntry::without_params("nbd_server_stop"));
        let only = block_on(r.call("save_config", Some(json!({"subsystems":["nbd"]})))).unwrap();
        assert_eq!(only["subsystems"].as_array().unwrap().len(), 1);
        let e = block_on(r.call("save_config", Some(json!({"subsystems":["zz"]})))).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENODEV));
        // a failing contributor propagates its errno
        a.add_subsystem_fn("bad", &[], || async { Err(RpcError::busy("busy")) }).unwrap();
        let e = block_on(r.call("save_config", None)).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBUSY));
    }
}
