//! Fuzz the JSON-RPC stream decoder: arbitrary bytes, split at arbitrary
//! points, must never panic, never buffer past the bound, and everything
//! decoded must re-encode to JSON that decodes to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiercache_jsonrpc::protocol::{Id, Request, Response};
use tiercache_jsonrpc::schema;
use tiercache_jsonrpc::wire::{self, Incoming, JsonStream, RequestDecoder};

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // First byte picks the chunk size so the corpus explores splits.
    let (chunk, body) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c).max(1), rest),
        None => return,
    };
    let mut d = RequestDecoder::with_limit(LIMIT);
    for piece in body.chunks(chunk) {
        d.push(piece);
        while let Some(item) = d.next_incoming() {
            check(item);
        }
        assert!(d.buffered() <= LIMIT);
    }
});

fn check(item: Incoming) {
    match item {
        Incoming::Single(req) => roundtrip(&req),
        Incoming::Batch(items) => {
            assert!(!items.is_empty());
            for r in items.iter().flatten() {
                roundtrip(r);
            }
        }
        Incoming::Invalid(resp) | Incoming::Fatal(resp) => {
            let mut js = JsonStream::new();
            js.push(&wire::encode_response(&resp));
            let v = js.next_value().expect("one value").expect("response is JSON");
            let back = Response::from_value(&v).expect("response is a response");
            assert_eq!(back, resp);
            assert!(back.outcome.is_err());
        }
    }
}

fn roundtrip(req: &Request) {
    let bytes = wire::encode_request(req);
    let mut d = RequestDecoder::new();
    d.push(&bytes);
    match d.next_incoming() {
        // Method and id survive exactly; params are only compared by shape
        // because serde_json (without `float_roundtrip`) may move a float by
        // one ulp when it is printed and parsed again (ids too, when they are
        // floats).
        Some(Incoming::Single(again)) => {
            assert_eq!(again.method, req.method);
            assert_eq!(again.id.is_some(), req.id.is_some());
            if !matches!(&req.id, Some(Id::Number(n)) if n.is_f64()) {
                assert_eq!(again.id, req.id);
            }
            assert_eq!(again.params.is_some(), req.params.is_some());
        }
        other => panic!("re-encoded request did not decode: {other:?}"),
    }
    // Param decoding of every known method must not panic either.
    let _ = schema::check_params(&req.method, req.params.as_ref());
}
