//! SPDK framing: a byte stream of concatenated JSON values, no length prefix,
//! no mandatory delimiter. Values may arrive several per read or split at any
//! byte. [`JsonStream`] finds value boundaries incrementally (each byte is
//! scanned once, however the input is split) and parses each complete value
//! once; [`RequestDecoder`] classifies values as requests or batches.
//!
//! A parse error is fatal for the connection: without a length prefix the
//! stream cannot be resynchronized. The number of bytes buffered for one
//! incomplete value is bounded (default 16 MiB); going over it is fatal too.

use crate::protocol::{Id, Request, Response, RpcError, INVALID_REQUEST};
use serde_json::Value;

/// Default bound on the bytes buffered for one value: 16 MiB.
pub const DEFAULT_MAX_BUFFERED: usize = 16 << 20;

/// A fatal stream error: the connection must be closed after reporting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// One value (or the pending incomplete value) exceeds the bound.
    TooLarge {
        /// The bound, in bytes.
        limit: usize,
    },
    /// The bytes are not JSON.
    Parse(String),
}

impl StreamError {
    /// The error to send before closing: -32600 for an oversized request,
    /// -32700 for bad JSON.
    pub fn to_rpc_error(&self) -> RpcError {
        match self {
            StreamError::TooLarge { limit } => {
                RpcError::new(INVALID_REQUEST, format!("Invalid request: request exceeds {limit} bytes"))
            }
            StreamError::Parse(msg) => RpcError::parse_error(msg),
        }
    }
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::TooLarge { limit } => write!(f, "value exceeds {limit} bytes"),
            StreamError::Parse(m) => write!(f, "invalid JSON: {m}"),
        }
    }
}

impl std::error::Error for StreamError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Between values.
    Idle,
    /// Inside an object or array.
    Container,
    /// A top-level string.
    Str,
    /// A top-level number / literal / garbage token.
    Scalar,
}

/// Incremental splitter + parser of a stream of JSON values.
#[derive(Debug)]
pub struct JsonStream {
    buf: Vec<u8>,
    /// Start of the current value in `buf`.
    start: usize,
    /// Next byte to scan.
    pos: usize,
    kind: Kind,
    depth: u64,
    in_str: bool,
    escape: bool,
    limit: usize,
    failed: bool,
}

impl Default for JsonStream {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStream {
    /// A stream with the default 16 MiB bound.
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_MAX_BUFFERED)
    }

    /// A stream bounding one value to `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        JsonStream {
            buf: Vec::new(),
            start: 0,
            pos: 0,
            kind: Kind::Idle,
            depth: 0,
            in_str: false,
            escape: false,
            limit,
            failed: false,
        }
    }

    /// Appends received bytes. Callers drain [`next_value`](Self::next_value)
    /// after each push so at most `limit` + one read stays buffered.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes received and not yet returned as values.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True once a fatal error was returned; the stream yields nothing more.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// True when only whitespace is pending.
    pub fn is_idle(&self) -> bool {
        self.kind == Kind::Idle && self.buf[self.start..].iter().all(|b| is_ws(*b))
    }

    /// The next complete value, `None` if more bytes are needed, or a fatal
    /// error (returned once; the stream is dead afterwards).
    pub fn next_value(&mut self) -> Option<Result<Value, StreamError>> {
        if self.failed {
            return None;
        }
        match self.scan() {
            Some(end) => {
                let len = end - self.start;
                if len > self.limit {
                    return Some(Err(self.fail(StreamError::TooLarge { limit: self.limit })));
                }
                let parsed = serde_json::from_slice::<Value>(&self.buf[self.start..end]);
                self.start = end;
                self.kind = Kind::Idle;
                self.compact();
                match parsed {
                    Ok(v) => Some(Ok(v)),
                    Err(e) => Some(Err(self.fail(StreamError::Parse(e.to_string())))),
                }
            }
            None => {
                if self.buffered() > self.limit {
                    Some(Err(self.fail(StreamError::TooLarge { limit: self.limit })))
                } else {
                    self.compact();
                    None
                }
            }
        }
    }

    fn fail(&mut self, e: StreamError) -> StreamError {
        self.failed = true;
        self.buf = Vec::new();
        self.start = 0;
        self.pos = 0;
        e
    }

    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.pos -= self.start;
            self.start = 0;
        } else if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.pos -= self.start;
            self.start = 0;
        }
    }

    /// Advances the scanner; returns the end (exclusive) of a complete value.
    fn scan(&mut self) -> Option<usize> {
        while self.pos < self.buf.len() {
            let c = self.buf[self.pos];
            match self.kind {
                Kind::Idle => {
                    if is_ws(c) {
                        self.pos += 1;
                        self.start = self.pos;
                        continue;
                    }
                    self.start = self.pos;
                    self.pos += 1;
                    self.in_str = false;
                    self.escape = false;
                    match c {
                        b'{' | b'[' => {
                            self.kind = Kind::Container;
                            self.depth = 1;
                        }
                        b'"' => {
                            self.kind = Kind::Str;
                            self.in_str = true;
                        }
                        // A stray closer can never start a value: hand it
                        // to the parser now so the error is immediate.
                        b'}' | b']' | b',' | b':' => return Some(self.pos),
                        _ => self.kind = Kind::Scalar,
                    }
                }
                Kind::Container => {
                    self.pos += 1;
                    if self.in_str {
                        self.string_byte(c);
                        continue;
                    }
                    match c {
                        b'"' => self.in_str = true,
                        b'{' | b'[' => self.depth += 1,
                        b'}' | b']' => {
                            self.depth -= 1;
                            if self.depth == 0 {
                                return Some(self.pos);
                            }
                        }
                        _ => {}
                    }
                }
                Kind::Str => {
                    self.pos += 1;
                    self.string_byte(c);
                    if !self.in_str {
                        return Some(self.pos);
                    }
                }
                Kind::Scalar => {
                    if is_ws(c) || matches!(c, b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':') {
                        return Some(self.pos);
                    }
                    self.pos += 1;
                }
            }
        }
        None
    }

    fn string_byte(&mut self, c: u8) {
        if self.escape {
            self.escape = false;
        } else if c == b'\\' {
            self.escape = true;
        } else if c == b'"' {
            self.in_str = false;
        }
    }
}

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// What the server must do with one decoded value.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A single request or notification.
    Single(Request),
    /// A non-empty batch; invalid members are already turned into their
    /// error responses.
    Batch(Vec<Result<Request, Response>>),
    /// Valid JSON that is not a request (or an empty batch): answer, go on.
    Invalid(Response),
    /// Fatal stream error: answer, then close the connection.
    Fatal(Response),
}

/// Turns one JSON value into an [`Incoming`].
pub fn classify(v: Value) -> Incoming {
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Incoming::Invalid(Response::error(Id::Null, RpcError::invalid_request("empty batch")));
            }
            Incoming::Batch(items.into_iter().map(|v| Request::from_value(v).map_err(|b| *b)).collect())
        }
        other => match Request::from_value(other) {
            Ok(r) => Incoming::Single(r),
            Err(resp) => Incoming::Invalid(*resp),
        },
    }
}

/// Request-side decoder used by the server.
#[derive(Debug, Default)]
pub struct RequestDecoder {
    stream: JsonStream,
}

impl RequestDecoder {
    /// A decoder with the default bound.
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_MAX_BUFFERED)
    }

    /// A decoder bounding one request to `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        RequestDecoder { stream: JsonStream::with_limit(limit) }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.stream.push(bytes)
    }

    /// The next decoded item, `None` if more bytes are needed. After a
    /// [`Incoming::Fatal`] it always returns `None`.
    pub fn next_incoming(&mut self) -> Option<Incoming> {
        match self.stream.next_value()? {
            Ok(v) => Some(classify(v)),
            Err(e) => Some(Incoming::Fatal(Response::error(Id::Null, e.to_rpc_error()))),
        }
    }

    /// True once a fatal error happened.
    pub fn is_closed(&self) -> bool {
        self.stream.is_failed()
    }

    /// Bytes buffered for an incomplete request.
    pub fn buffered(&self) -> usize {
        self.stream.buffered()
    }
}

fn to_bytes(v: &Value) -> Vec<u8> {
    // Serializing a `Value` cannot fail (all map keys are strings); keep a
    // fallback anyway rather than panic.
    let mut out = serde_json::to_vec(v).unwrap_or_else(|e| {
        format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{{\"code\":-32603,\"message\":{}}}}}",
            Value::String(format!("Internal error: {e}"))
        )
        .into_bytes()
    });
    out.push(b'\n');
    out
}

/// Encodes one response (a newline is appended; SPDK peers ignore it).
pub fn encode_response(r: &Response) -> Vec<u8> {
    to_bytes(&r.to_value())
}

/// Encodes a batch answer (a JSON array of responses).
pub fn encode_batch(rs: &[Response]) -> Vec<u8> {
    to_bytes(&Value::Array(rs.iter().map(Response::to_value).collect()))
}

/// Encodes a request or notification.
pub fn encode_request(r: &Request) -> Vec<u8> {
    to_bytes(&r.to_value())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{INVALID_REQUEST, PARSE_ERROR};
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    fn drain(s: &mut JsonStream) -> Vec<Result<Value, StreamError>> {
        std::iter::from_fn(|| s.next_value()).collect()
    }

    #[test]
    fn several_values_in_one_push() {
        let mut s = JsonStream::new();
        s.push(br#"{"a":1}[1,2] "s\"}" 12 true {"b":"}{"}"#);
        let vals: Vec<Value> = drain(&mut s).into_iter().map(Result::unwrap).collect();
        assert_eq!(vals[..3], [json!({"a":1}), json!([1, 2]), json!("s\"}")]);
        assert_eq!(vals[3..], [json!(12), json!(true), json!({"b":"}{"})]);
        assert!(s.is_idle());
    }

    #[test]
    fn split_at_every_byte() {
        let input = br#" {"jsonrpc":"2.0","method":"x\\y\"z","params":{"a":[1,{"b":null}]},"id":1}
            [{"k":"\u00e9"}] "#;
        for split in 0..input.len() {
            let mut s = JsonStream::new();
            s.push(&input[..split]);
            let mut out = drain(&mut s);
            s.push(&input[split..]);
            out.extend(drain(&mut s));
            assert_eq!(out.len(), 2, "split {split}");
            assert_eq!(out[1], Ok(json!([{"k":"é"}])));
        }
        // one byte at a time
        let mut s = JsonStream::new();
        let mut n = 0;
        for b in input.iter() {
            s.push(std::slice::from_ref(b));
            n += drain(&mut s).len();
        }
        assert_eq!(n, 2);
        assert_eq!(s.buffered(), 0); // trailing whitespace is consumed
    }

    #[test]
    fn scalar_waits_for_delimiter() {
        let mut s = JsonStream::new();
        s.push(b"12");
        assert!(s.next_value().is_none());
        s.push(b"3{}");
        assert_eq!(s.next_value(), Some(Ok(json!(123))));
        assert_eq!(s.next_value(), Some(Ok(json!({}))));
    }

    #[test]
    fn parse_error_is_fatal_once() {
        for bad in [&b"{\"a\" 1}"[..], b"}", b"nul ", b"[1,]", b"{\"a\":\xff}", b"\"\xc3\""] {
            let mut s = JsonStream::new();
            s.push(bad);
            match s.next_value() {
                Some(Err(StreamError::Parse(_))) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bad)),
            }
            assert!(s.is_failed());
            s.push(b"{}");
            assert_eq!(s.next_value(), None);
        }
    }

    #[test]
    fn deep_nesting_is_a_parse_error_not_a_crash() {
        let mut s = JsonStream::new();
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        s.push(deep.as_bytes());
        assert!(matches!(s.next_value(), Some(Err(StreamError::Parse(_)))));
    }

    #[test]
    fn bound_on_incomplete_and_complete_values() {
        let mut s = JsonStream::with_limit(16);
        s.push(b"{\"a\":\"0123456789");
        assert_eq!(s.next_value(), None);
        s.push(b"0123");
        assert_eq!(s.next_value(), Some(Err(StreamError::TooLarge { limit: 16 })));
        assert_eq!(s.next_value(), None);
        let mut s = JsonStream::with_limit(16);
        s.push(b"[\"0123456789abcdef\"]");
        assert_eq!(s.next_value(), Some(Err(StreamError::TooLarge { limit: 16 })));
        // a value within the bound right after others is fine
        let mut s = JsonStream::with_limit(16);
        for _ in 0..10_000 {
            s.push(b"[\"0123456789\"] ");
            assert!(matches!(s.next_value(), Some(Ok(_))));
        }
        assert!(s.buffered() <= 1);
    }

    #[test]
    fn stream_error_codes() {
        assert_eq!(StreamError::Parse("x".into()).to_rpc_error().code, PARSE_ERROR);
        let e = StreamError::TooLarge { limit: 5 }.to_rpc_error();
        assert_eq!(e.code, INVALID_REQUEST);
        assert!(e.message.contains("exceeds 5 bytes"));
        assert!(StreamError::Parse("x".into()).to_string().contains("invalid JSON"));
    }

    #[test]
    fn request_decoder_classifies() {
        let mut d = RequestDecoder::new();
        d.push(
            br#"{"jsonrpc":"2.0","method":"a","id":1}[]
            [{"jsonrpc":"2.0","method":"b"},7]
            {"jsonrpc":"2.0"} {"#,
        );
        assert!(matches!(d.next_incoming(), Some(Incoming::Single(r)) if r.method == "a"));
        match d.next_incoming() {
            Some(Incoming::Invalid(r)) => {
                assert_eq!(r.outcome.unwrap_err().code, INVALID_REQUEST)
            }
            other => panic!("{other:?}"),
        }
        match d.next_incoming() {
            Some(Incoming::Batch(items)) => {
                assert!(items[0].as_ref().unwrap().is_notification());
                assert!(items[1].is_err());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(d.next_incoming(), Some(Incoming::Invalid(_))));
        assert_eq!(d.next_incoming(), None);
        assert_eq!(d.buffered(), 1);
        d.push(b"]");
        match d.next_incoming() {
            Some(Incoming::Fatal(r)) => assert_eq!(r.outcome.unwrap_err().code, PARSE_ERROR),
            other => panic!("{other:?}"),
        }
        assert!(d.is_closed());
        assert_eq!(d.next_incoming(), None);
    }

    #[test]
    fn encoding() {
        let r = Response::result(Id::from(1), json!({"x":[1]}));
        let b = encode_response(&r);
        assert_eq!(b.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v, r.to_value());
        let b = encode_batch(&[r.clone(), r]);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        let q = Request::new("m", None, Id::from(2));
        let v: Value = serde_json::from_slice(&encode_request(&q)).unwrap();
        assert_eq!(v["method"], "m");
    }

    /// Seeded random input: random splits of valid streams decode to the
    /// same values; random garbage never panics and never over-buffers.
    #[test]
    fn seeded_random_input() {
        let seed: u64 = std::env::var("TIERCACHE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        println!("seeded_random_input seed={seed} (set TIERCACHE_TEST_SEED to replay)");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let alphabet = b"{}[]\":,\\ \n0123456789.-+eEtruefalsnl\xc3\xa9ab";
        for _ in 0..300 {
            // valid stream split randomly
            let vals: Vec<Value> = (0..rng.gen_range(1..6))
                .map(|i| json!({"jsonrpc":"2.0","method":format!("m{i}\"}}"),"params":{"a":[i, "x\\"]},"id":i}))
                .collect();
            let mut bytes = Vec::new();
            for v in &vals {
                bytes.extend(serde_json::to_vec(v).unwrap());
                bytes.extend(std::iter::repeat_n(b' ', rng.gen_range(0..3)));
            }
            let mut s = JsonStream::new();
            let mut got = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                let n = rng.gen_range(1..=8).min(bytes.len() - i);
                s.push(&bytes[i..i + n]);
                i += n;
                got.extend(drain(&mut s).into_iter().map(Result::unwrap));
            }
            assert_eq!(got, vals, "seed {seed}");
            // garbage
            let limit = rng.gen_range(8..256);
            let mut s = JsonStream::with_limit(limit);
            for _ in 0..rng.gen_range(1..50) {
                let chunk: Vec<u8> =
                    (0..rng.gen_range(0..40)).map(|_| alphabet[rng.gen_range(0..alphabet.len())]).collect();
                s.push(&chunk);
                for r in drain(&mut s) {
                    if r.is_err() {
                        assert!(s.is_failed());
                    }
                }
                assert!(s.buffered() <= limit, "seed {seed}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512), cut in 0usize..512) {
            let mut d = RequestDecoder::with_limit(128);
            let cut = cut.min(data.len());
            d.push(&data[..cut]);
            while d.next_incoming().is_some() {}
            d.push(&data[cut..]);
            while d.next_incoming().is_some() {}
            proptest::prop_assert!(d.buffered() <= 128);
        }
    }
}
