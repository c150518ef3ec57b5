//! JSON-RPC 2.0 message types: requests, notifications, responses, errors.
//!
//! Error codes follow the JSON-RPC 2.0 specification for protocol errors and
//! SPDK's convention for application errors: the code is `-errno` and the
//! message says what failed (e.g. `-17` / `bdev malloc0 already exists`).

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;

/// The only protocol version accepted and emitted.
pub const JSONRPC_VERSION: &str = "2.0";
/// Invalid JSON was received.
pub const PARSE_ERROR: i32 = -32700;
/// The JSON sent is not a valid request object.
pub const INVALID_REQUEST: i32 = -32600;
/// The method does not exist.
pub const METHOD_NOT_FOUND: i32 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i32 = -32602;
/// Internal JSON-RPC error (handler bug, serialization failure...).
pub const INTERNAL_ERROR: i32 = -32603;

/// A request id: a string, a number or `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    /// A numeric id.
    Number(serde_json::Number),
    /// A string id.
    String(String),
    /// An explicit `null` id (also used when the request id is unknown).
    Null,
}

impl Id {
    /// Converts a JSON value into an id; `None` if the value cannot be an id.
    pub fn from_value(v: &Value) -> Option<Id> {
        match v {
            Value::Number(n) => Some(Id::Number(n.clone())),
            Value::String(s) => Some(Id::String(s.clone())),
            Value::Null => Some(Id::Null),
            _ => None,
        }
    }

    /// The id as a JSON value.
    pub fn to_value(&self) -> Value {
        match self {
            Id::Number(n) => Value::Number(n.clone()),
            Id::String(s) => Value::String(s.clone()),
            Id::Null => Value::Null,
        }
    }
}

impl From<u64> for Id {
    fn from(n: u64) -> Self {
        Id::Number(n.into())
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id::String(s.to_string())
    }
}

/// A JSON-RPC error object. Application errors use `code = -errno`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    /// Error code (JSON-RPC reserved code or `-errno`).
    pub code: i32,
    /// Human-readable message.
    pub message: String,
    /// Optional structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    /// An error with an arbitrary code.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError { code, message: message.into(), data: None }
    }

    /// -32700: the byte stream is not valid JSON.
    pub fn parse_error(detail: impl fmt::Display) -> Self {
        Self::new(PARSE_ERROR, format!("Parse error: {detail}"))
    }

    /// -32600: valid JSON that is not a valid request.
    pub fn invalid_request(detail: impl fmt::Display) -> Self {
        Self::new(INVALID_REQUEST, format!("Invalid request: {detail}"))
    }

    /// -32601: no such method.
    pub fn method_not_found(method: &str) -> Self {
        Self::new(METHOD_NOT_FOUND, format!("Method not found: {method}"))
    }

    /// -32602: the parameters do not fit the method.
    pub fn invalid_params(detail: impl fmt::Display) -> Self {
        Self::new(INVALID_PARAMS, format!("invalid params: {detail}"))
    }

    /// -32603: internal error.
    pub fn internal(detail: impl fmt::Display) -> Self {
        Self::new(INTERNAL_ERROR, format!("Internal error: {detail}"))
    }

    /// An application error carrying an errno; the code is `-errno`
    /// (the sign of `errno` is ignored, SPDK code paths pass either).
    pub fn from_errno(errno: i32, message: impl Into<String>) -> Self {
        let e = errno.checked_abs().unwrap_or(libc::EINVAL);
        Self::new(-e, message)
    }

    /// `-EEXIST` (e.g. `bdev malloc0 already exists`).
    pub fn exists(message: impl Into<String>) -> Self {
        Self::from_errno(libc::EEXIST, message)
    }

    /// `-ENODEV` (e.g. unknown bdev).
    pub fn no_device(message: impl Into<String>) -> Self {
        Self::from_errno(libc::ENODEV, message)
    }

    /// `-EINVAL`.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::from_errno(libc::EINVAL, message)
    }

    /// `-EBUSY`.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::from_errno(libc::EBUSY, message)
    }

    /// Attaches structured data.
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// The errno of an application error (`code` in `-4095..=-1`).
    pub fn errno(&self) -> Option<i32> {
        if (-4095..=-1).contains(&self.code) {
            Some(-self.code)
        } else {
            None
        }
    }

    /// Parses an error object received from a peer.
    pub fn from_value(v: &Value) -> Option<RpcError> {
        let o = v.as_object()?;
        let code = o.get("code")?.as_i64()?;
        let code = i32::try_from(code).ok()?;
        let message = o.get("message").and_then(Value::as_str).unwrap_or("").to_string();
        Some(RpcError { code, message, data: o.get("data").cloned() })
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}

impl From<std::io::Error> for RpcError {
    fn from(e: std::io::Error) -> Self {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        RpcError::from_errno(errno, e.to_string())
    }
}

impl From<ParamError> for RpcError {
    fn from(e: ParamError) -> Self {
        RpcError::invalid_params(e)
    }
}

/// Why a method's parameters were rejected. Always names the offending
/// field when there is one; becomes a -32602 error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamError {
    /// A required field is absent.
    Missing(String),
    /// A field has a bad value.
    Invalid {
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A decoding error reported by serde (unknown field, ...), with the
    /// field already named in the text.
    Decode(String),
    /// Params given as something other than an object.
    NotAnObject,
    /// A constraint between several fields.
    Conflict(String),
}

impl ParamError {
    /// Shorthand for [`ParamError::Invalid`].
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        ParamError::Invalid { field: field.to_string(), reason: reason.into() }
    }

    /// The field this error is about, when it is about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            ParamError::Missing(f) => Some(f),
            ParamError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamError::Missing(field) => write!(f, "missing field \"{field}\""),
            ParamError::Invalid { field, reason } => write!(f, "{field}: {reason}"),
            ParamError::Decode(msg) => f.write_str(msg),
            ParamError::NotAnObject => f.write_str("params must be an object of named parameters"),
            ParamError::Conflict(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for ParamError {}

/// A request; a notification when `id` is `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Method name.
    pub method: String,
    /// Params (object or array); `None` when absent or `null`.
    pub params: Option<Value>,
    /// Id; `None` for a notification (no response is sent).
    pub id: Option<Id>,
}

impl Request {
    /// A request expecting a response.
    pub fn new(method: impl Into<String>, params: Option<Value>, id: Id) -> Self {
        Request { method: method.into(), params, id: Some(id) }
    }

    /// A notification (no response).
    pub fn notification(method: impl Into<String>, params: Option<Value>) -> Self {
        Request { method: method.into(), params, id: None }
    }

    /// True for a notification.
    pub fn is_notification(&self) -> bool {
        self.id.is_none()
    }

    /// Validates a decoded JSON value as a request. On failure returns the
    /// -32600 response to send (id taken from the value when usable).
    pub fn from_value(v: Value) -> Result<Request, Box<Response>> {
        let mut obj = match v {
            Value::Object(o) => o,
            other => {
                let what = json_type_name(&other);
                return Err(Box::new(Response::error(
                    Id::Null,
                    RpcError::invalid_request(format!("expected an object, got {what}")),
                )));
            }
        };
        let id = match obj.remove("id") {
            None => None,
            Some(v) => match Id::from_value(&v) {
                Some(id) => Some(id),
                None => {
                    return Err(Box::new(Response::error(
                        Id::Null,
                        RpcError::invalid_request("\"id\" must be a string, a number or null"),
                    )))
                }
            },
        };
        let err_id = id.clone().unwrap_or(Id::Null);
        let fail = |msg: &str| Err(Box::new(Response::error(err_id.clone(), RpcError::invalid_request(msg))));
        match obj.get("jsonrpc") {
            Some(Value::String(s)) if s == JSONRPC_VERSION => {}
            Some(_) => return fail("\"jsonrpc\" must be \"2.0\""),
            None => return fail("missing \"jsonrpc\": \"2.0\""),
        }
        let method = match obj.remove("method") {
            Some(Value::String(s)) => s,
            Some(_) => return fail("\"method\" must be a string"),
            None => return fail("missing \"method\""),
        };
        let params = match obj.remove("params") {
            None | Some(Value::Null) => None,
            Some(p @ Value::Object(_)) | Some(p @ Value::Array(_)) => Some(p),
            Some(_) => return fail("\"params\" must be an object or an array"),
        };
        Ok(Request { method, params, id })
    }

    /// The request as a JSON value.
    pub fn to_value(&self) -> Value {
        let mut o = Map::new();
        o.insert("jsonrpc".into(), JSONRPC_VERSION.into());
        o.insert("method".into(), Value::String(self.method.clone()));
        if let Some(p) = &self.params {
            o.insert("params".into(), p.clone());
        }
        if let Some(id) = &self.id {
            o.insert("id".into(), id.to_value());
        }
        Value::Object(o)
    }
}

/// A response: a result or an error, for one id.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Id of the request answered (`null` when it could not be known).
    pub id: Id,
    /// The result or the error.
    pub outcome: Result<Value, RpcError>,
}

impl Response {
    /// A successful response.
    pub fn result(id: Id, result: Value) -> Self {
        Response { id, outcome: Ok(result) }
    }

    /// An error response.
    pub fn error(id: Id, error: RpcError) -> Self {
        Response { id, outcome: Err(error) }
    }

    /// The response as a JSON value.
    pub fn to_value(&self) -> Value {
        let mut o = Map::new();
        o.insert("jsonrpc".into(), JSONRPC_VERSION.into());
        o.insert("id".into(), self.id.to_value());
        match &self.outcome {
            Ok(v) => {
                o.insert("result".into(), v.clone());
            }
            Err(e) => {
                let mut eo = Map::new();
                eo.insert("code".into(), e.code.into());
                eo.insert("message".into(), Value::String(e.message.clone()));
                if let Some(d) = &e.data {
                    eo.insert("data".into(), d.clone());
                }
                o.insert("error".into(), Value::Object(eo));
            }
        }
        Value::Object(o)
    }

    /// Parses a response received from a server.
    pub fn from_value(v: &Value) -> Result<Response, String> {
        let o = v.as_object().ok_or_else(|| format!("response is {}, not an object", json_type_name(v)))?;
        let id = match o.get("id") {
            None => Id::Null,
            Some(v) => Id::from_value(v).ok_or("response has an invalid \"id\"")?,
        };
        match (o.get("result"), o.get("error")) {
            (Some(r), None) => Ok(Response::result(id, r.clone())),
            (None, Some(e)) => RpcError::from_value(e)
                .map(|e| Response::error(id, e))
                .ok_or_else(|| "response has a malformed \"error\" object".to_string()),
            _ => Err("response must have exactly one of \"result\" and \"error\"".into()),
        }
    }
}

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

/// "object", "array", "string"... for messages.
pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reject(v: Value) -> Response {
        *Request::from_value(v).unwrap_err()
    }

    #[test]
    fn parses_request_and_notification() {
        let r = Request::from_value(json!({"jsonrpc":"2.0","method":"m","params":{"a":1},"id":7})).unwrap();
        assert_eq!(r.method, "m");
        assert_eq!(r.id, Some(Id::from(7)));
        assert!(!r.is_notification());
        let n = Request::from_value(json!({"jsonrpc":"2.0","method":"m"})).unwrap();
        assert!(n.is_notification());
        assert_eq!(n.params, None);
        let null_id = Request::from_value(json!({"jsonrpc":"2.0","method":"m","id":null})).unwrap();
        assert_eq!(null_id.id, Some(Id::Null));
        let null_params = Request::from_value(json!({"jsonrpc":"2.0","method":"m","params":null,"id":"x"})).unwrap();
        assert_eq!(null_params.params, None);
        assert_eq!(null_params.id, Some(Id::from("x")));
    }

    #[test]
    fn invalid_requests_are_32600() {
        for (v, id) in [
            (json!([1]), Id::Null),
            (json!(5), Id::Null),
            (json!({"method":"m","id":1}), Id::from(1)),
            (json!({"jsonrpc":"1.0","method":"m","id":1}), Id::from(1)),
            (json!({"jsonrpc":"2.0","id":1}), Id::from(1)),
            (json!({"jsonrpc":"2.0","method":5,"id":1}), Id::from(1)),
            (json!({"jsonrpc":"2.0","method":"m","params":3,"id":"a"}), Id::from("a")),
            (json!({"jsonrpc":"2.0","method":"m","id":{}}), Id::Null),
        ] {
            let r = reject(v);
            assert_eq!(r.id, id);
            assert_eq!(r.outcome.unwrap_err().code, INVALID_REQUEST);
        }
    }

    #[test]
    fn response_roundtrip() {
        let ok = Response::result(Id::from(1), json!(true));
        assert_eq!(ok.to_value(), json!({"jsonrpc":"2.0","id":1,"result":true}));
        assert_eq!(Response::from_value(&ok.to_value()).unwrap(), ok);
        let err = Response::error(Id::from("a"), RpcError::exists("bdev malloc0 already exists"));
        let v = err.to_value();
        assert_eq!(v["error"]["code"], json!(-17));
        let back = Response::from_value(&v).unwrap();
        assert_eq!(back.outcome.unwrap_err().errno(), Some(libc::EEXIST));
        assert!(Response::from_value(&json!({"id":1})).is_err());
        assert!(Response::from_value(&json!(3)).is_err());
        assert!(Response::from_value(&json!({"id":1,"error":{"code":"x"}})).is_err());
        assert!(Response::from_value(&json!({"id":[],"result":1})).is_err());
    }

    #[test]
    fn error_codes_and_errno() {
        assert_eq!(RpcError::parse_error("x").code, -32700);
        assert_eq!(RpcError::invalid_request("x").code, -32600);
        assert_eq!(RpcError::method_not_found("x").code, -32601);
        assert_eq!(RpcError::invalid_params("x").code, -32602);
        assert_eq!(RpcError::internal("x").code, -32603);
        assert_eq!(RpcError::internal("x").errno(), None);
        let e = RpcError::no_device("bdev nope not found");
        assert_eq!((e.code, e.errno()), (-libc::ENODEV, Some(libc::ENODEV)));
        assert_eq!(RpcError::from_errno(-libc::EBUSY, "b").code, -libc::EBUSY);
        assert_eq!(RpcError::from_errno(i32::MIN, "b").code, -libc::EINVAL);
        assert_eq!(RpcError::invalid_argument("x").errno(), Some(libc::EINVAL));
        assert_eq!(RpcError::busy("x").errno(), Some(libc::EBUSY));
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(RpcError::from(io).errno(), Some(libc::ENOSPC));
        let io = std::io::Error::other("x");
        assert_eq!(RpcError::from(io).errno(), Some(libc::EIO));
        let e = RpcError::exists("x").with_data(json!({"k":1}));
        assert!(e.to_string().contains("code -17"));
        assert_eq!(RpcError::from_value(&serde_json::to_value(&e).unwrap()), Some(e));
    }

    #[test]
    fn param_error_messages() {
        let e: RpcError = ParamError::Missing("num_blocks".into()).into();
        assert_eq!(e.code, INVALID_PARAMS);
        assert_eq!(e.message, "invalid params: missing field \"num_blocks\"");
        let e = ParamError::invalid("num_blocks", "must be > 0");
        assert_eq!(e.field(), Some("num_blocks"));
        assert_eq!(e.to_string(), "num_blocks: must be > 0");
        assert_eq!(ParamError::NotAnObject.field(), None);
        assert!(ParamError::Conflict("a and b".into()).to_string().contains("a and b"));
    }

    #[test]
    fn request_to_value() {
        let r = Request::new("m", Some(json!({"a":1})), Id::from(3));
        assert_eq!(r.to_value(), json!({"jsonrpc":"2.0","method":"m","params":{"a":1},"id":3}));
        let n = Request::notification("m", None);
        assert_eq!(n.to_value(), json!({"jsonrpc":"2.0","method":"m"}));
        assert_eq!(Request::from_value(r.to_value()).unwrap(), r);
    }
}
