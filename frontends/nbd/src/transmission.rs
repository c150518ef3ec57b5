//! Transmission phase: request decoding and validation, reply encoding.
//!
//! Implements the spec sections "Request message", "Simple reply message",
//! "Structured reply chunk message", "Command flags", "Request types",
//! "Structured reply types", "Error values" and "Size constraints".
//!
//! [`RequestDecoder`] is a sans-IO state machine:
//!
//! ```text
//!  Header ── 28 bytes, bad magic ──────────────> Failed   (drop connection)
//!         ── valid request ──> Event::Request    (WRITE: ──> Payload)
//!         ── invalid request ─> Event::Rejected  (WRITE: ──> Skip)
//!         ── NBD_CMD_DISC ───> Event::Disconnect ──> Closed
//!  Payload ── Event::WriteData slices (borrowed from the input) ──> Header
//!  Skip    ── rejected write payload silently discarded ──────────> Header
//! ```
//!
//! A rejected request is answered with an error reply and the connection
//! continues; a rejected `NBD_CMD_WRITE` still has its payload on the wire,
//! which the decoder discards so the stream stays in sync. Only a bad magic,
//! a write payload too large to be worth discarding, or data after
//! `NBD_CMD_DISC` are [`ProtocolViolation`]s that end the connection.
//!
//! The reply encoders produce headers only (fixed-size arrays, no
//! allocation); read payloads are sent by the server from its own buffers.

use std::fmt;

use crate::handshake::BlockSizes;
use crate::proto::{
    ChunkType, Command, CommandFlags, Cookie, NbdError, ReplyFlags, TransmissionFlags, DEFAULT_MAX_PAYLOAD,
    MAX_STRING_LEN, REQUEST_HEADER_LEN, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// What the decoder validates requests against (from the handshake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    size: u64,
    flags: TransmissionFlags,
    block_sizes: BlockSizes,
    structured_replies: bool,
    discard_limit: u32,
}

impl ExportConfig {
    /// Config for an export of `size` bytes with the transmission `flags`
    /// that were sent to the client.
    pub fn new(size: u64, flags: TransmissionFlags, block_sizes: BlockSizes, structured_replies: bool) -> Self {
        ExportConfig { size, flags, block_sizes, structured_replies, discard_limit: 2 * DEFAULT_MAX_PAYLOAD }
    }
    /// Largest payload of a *rejected* write that is read and discarded
    /// (default 64 MiB); larger ones are a [`ProtocolViolation`].
    pub fn with_discard_limit(mut self, limit: u32) -> Self {
        self.discard_limit = limit;
        self
    }
    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Transmission flags as sent.
    pub fn flags(&self) -> TransmissionFlags {
        self.flags
    }
    /// Size constraints enforced.
    pub fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }
    /// Whether replies must be structured.
    pub fn structured_replies(&self) -> bool {
        self.structured_replies
    }
}

/// A request header as it came off the wire (magic already checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRequest {
    /// Command flags.
    pub flags: CommandFlags,
    /// Request type, possibly unknown.
    pub command: u16,
    /// Client cookie.
    pub cookie: Cookie,
    /// Offset.
    pub offset: u64,
    /// Length (for `NBD_CMD_WRITE`, the payload that follows).
    pub length: u32,
}

impl RawRequest {
    /// Parse a 28-byte request header.
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RawRequest, ProtocolViolation> {
        let [m0, m1, m2, m3, f0, f1, t0, t1, c0, c1, c2, c3, c4, c5, c6, c7, o0, o1, o2, o3, o4, o5, o6, o7, l0, l1, l2, l3] =
            *b;
        let magic = u32::from_be_bytes([m0, m1, m2, m3]);
        if magic != REQUEST_MAGIC {
            return Err(ProtocolViolation::BadMagic(magic));
        }
        Ok(RawRequest {
            flags: CommandFlags(u16::from_be_bytes([f0, f1])),
            command: u16::from_be_bytes([t0, t1]),
            cookie: Cookie(u64::from_be_bytes([c0, c1, c2, c3, c4, c5, c6, c7])),
            offset: u64::from_be_bytes([o0, o1, o2, o3, o4, o5, o6, o7]),
            length: u32::from_be_bytes([l0, l1, l2, l3]),
        })
    }

    /// Bytes of payload following this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write.raw() {
            self.length
        } else {
            0
        }
    }
}

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Client cookie, to echo in the reply.
    pub cookie: Cookie,
    /// What to do.
    pub command: Command,
    /// Flags, all valid for this command and export.
    pub flags: CommandFlags,
    /// Offset (0 for `FLUSH` / `DISC`).
    pub offset: u64,
    /// Length; for `WRITE`, the payload delivered as [`Event::WriteData`].
    pub length: u32,
}

impl Request {
    /// `NBD_CMD_FLAG_FUA` is set: persist before replying.
    pub fn fua(&self) -> bool {
        self.flags.contains(CommandFlags::FUA)
    }
}

/// Why a request was refused (it is answered with an error reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// Request type not defined by the spec.
    UnknownCommand(u16),
    /// Flag bits not defined by the spec.
    UnknownFlags(u16),
    /// A defined flag not valid for this command or not negotiated.
    FlagNotAllowed(CommandFlags),
    /// A command the export did not advertise (or this server never does).
    NotNegotiated(Command),
    /// A write-type command on a read-only export.
    ReadOnly,
    /// A zero length.
    ZeroLength,
    /// `FLUSH` with nonzero offset or length.
    NonZeroFields,
    /// Longer than the maximum payload.
    TooLarge {
        /// Requested length.
        length: u32,
        /// Maximum payload.
        max: u32,
    },
    /// `offset + length` beyond the export (or overflowing 64 bits).
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        length: u32,
        /// Export size.
        size: u64,
    },
    /// Offset or length not a multiple of the minimum block size.
    Misaligned {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        length: u32,
        /// Minimum block size.
        minimum: u32,
    },
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RequestError::UnknownCommand(c) => write!(f, "unknown command {c}"),
            RequestError::UnknownFlags(b) => write!(f, "unknown command flags {b:#x}"),
            RequestError::FlagNotAllowed(fl) => write!(f, "flag {fl:?} not allowed here"),
            RequestError::NotNegotiated(c) => write!(f, "command {c:?} not supported by export"),
            RequestError::ReadOnly => write!(f, "export is read-only"),
            RequestError::ZeroLength => write!(f, "zero length"),
            RequestError::NonZeroFields => write!(f, "offset and length must be zero"),
            RequestError::TooLarge { length, max } => {
                write!(f, "length {length} exceeds maximum payload {max}")
            }
            RequestError::OutOfRange { offset, length, size } => {
                write!(f, "range {offset}+{length} exceeds export size {size}")
            }
            RequestError::Misaligned { offset, length, minimum } => {
                write!(f, "range {offset}+{length} not aligned to {minimum}")
            }
        }
    }
}

/// A refused request: send [`Rejection::encode`] and carry on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Client cookie.
    pub cookie: Cookie,
    /// Raw request type.
    pub command: u16,
    /// Error value to send.
    pub error: NbdError,
    /// Why.
    pub reason: RequestError,
    /// Write payload bytes the decoder discards after this event.
    pub skipped_payload: u32,
}

impl Rejection {
    /// Append the error reply: a structured `NBD_REPLY_TYPE_ERROR` chunk
    /// (with `DONE` and the reason as message) when structured replies were
    /// negotiated — mandatory for `NBD_CMD_READ` — else a simple reply.
    pub fn encode(&self, structured: bool, out: &mut Vec<u8>) {
        if structured {
            let msg = self.reason.to_string();
            error_chunk(out, self.cookie, self.error, &msg, true);
        } else {
            out.extend_from_slice(&simple_reply(self.cookie, Some(self.error)));
        }
    }
}

/// Errors that end the connection (hard disconnect).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolViolation {
    /// Request did not start with `NBD_REQUEST_MAGIC`.
    BadMagic(u32),
    /// A rejected write whose payload exceeds the discard limit.
    PayloadTooLarge(u32),
    /// Bytes arrived after `NBD_CMD_DISC`.
    DataAfterDisconnect,
}

impl fmt::Display for ProtocolViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolViolation::BadMagic(m) => write!(f, "bad request magic {m:#010x}"),
            ProtocolViolation::PayloadTooLarge(l) => write!(f, "write payload of {l} bytes"),
            ProtocolViolation::DataAfterDisconnect => write!(f, "data after NBD_CMD_DISC"),
        }
    }
}

impl std::error::Error for ProtocolViolation {}

fn reject(raw: &RawRequest, error: NbdError, reason: RequestError) -> Rejection {
    Rejection { cookie: raw.cookie, command: raw.command, error, reason, skipped_payload: raw.payload_len() }
}

/// Validate a request header against the export ("Request types", "Error
/// values", "Size constraints"). `NBD_CMD_DISC` is always accepted.
///
/// Choices where the spec leaves room: an `offset + length` that overflows
/// 64 bits is treated like any range past the end (`ENOSPC` for writes,
/// `EINVAL` otherwise), since `EOVERFLOW` is reserved for DF reads and
/// oversized payload-free commands; an oversized `READ` gets `EOVERFLOW` with
/// structured replies (the spec's retry hint) and `EINVAL` without.
pub fn validate(raw: &RawRequest, cfg: &ExportConfig) -> Result<Request, Rejection> {
    use Command as C;
    use NbdError::{Inval, NoSpc, Overflow, Perm};
    let bad = |e, r| Err(reject(raw, e, r));
    let Some(cmd) = Command::from_raw(raw.command) else {
        return bad(Inval, RequestError::UnknownCommand(raw.command));
    };
    let ok = Request { cookie: raw.cookie, command: cmd, flags: raw.flags, offset: raw.offset, length: raw.length };
    if cmd == C::Disc {
        return Ok(ok);
    }
    if raw.flags.unknown_bits() != 0 {
        return bad(Inval, RequestError::UnknownFlags(raw.flags.unknown_bits()));
    }
    let tx = cfg.flags;
    let allowed = |flag: CommandFlags| match flag {
        CommandFlags::FUA => tx.contains(TransmissionFlags::SEND_FUA),
        CommandFlags::NO_HOLE => cmd == C::WriteZeroes,
        CommandFlags::DF => cmd == C::Read && cfg.structured_replies && tx.contains(TransmissionFlags::SEND_DF),
        CommandFlags::FAST_ZERO => cmd == C::WriteZeroes && tx.contains(TransmissionFlags::SEND_FAST_ZERO),
        // REQ_ONE (block status is never supported), PAYLOAD_LEN (extended
        // headers are never negotiated).
        _ => false,
    };
    for bit in 0..16 {
        let flag = CommandFlags(1 << bit);
        if raw.flags.contains(flag) && !allowed(flag) {
            return bad(Inval, RequestError::FlagNotAllowed(flag));
        }
    }
    let advertised = match cmd {
        C::Read | C::Write => true,
        C::Flush => tx.contains(TransmissionFlags::SEND_FLUSH),
        C::Trim => tx.contains(TransmissionFlags::SEND_TRIM),
        C::WriteZeroes => tx.contains(TransmissionFlags::SEND_WRITE_ZEROES),
        C::Cache => tx.contains(TransmissionFlags::SEND_CACHE),
        C::Disc | C::BlockStatus | C::Resize => false,
    };
    if !advertised {
        return bad(Inval, RequestError::NotNegotiated(cmd));
    }
    let writes = matches!(cmd, C::Write | C::Trim | C::WriteZeroes);
    if writes && tx.contains(TransmissionFlags::READ_ONLY) {
        return bad(Perm, RequestError::ReadOnly);
    }
    if cmd == C::Flush {
        if raw.offset != 0 || raw.length != 0 {
            return bad(Inval, RequestError::NonZeroFields);
        }
        return Ok(ok);
    }
    if raw.length == 0 {
        return bad(Inval, RequestError::ZeroLength);
    }
    let max = cfg.block_sizes.maximum();
    if matches!(cmd, C::Read | C::Write) && raw.length > max {
        let e = if cmd == C::Read && cfg.structured_replies { Overflow } else { Inval };
        return bad(e, RequestError::TooLarge { length: raw.length, max });
    }
    let min = cfg.block_sizes.minimum();
    // `min` is a power of two (a BlockSizes invariant): a mask tests alignment.
    if raw.offset & (u64::from(min) - 1) != 0 || raw.length & (min - 1) != 0 {
        return bad(Inval, RequestError::Misaligned { offset: raw.offset, length: raw.length, minimum: min });
    }
    let fits = raw.offset.checked_add(u64::from(raw.length)).is_some_and(|end| end <= cfg.size);
    if !fits {
        let e = if matches!(cmd, C::Write | C::WriteZeroes) { NoSpc } else { Inval };
        return bad(e, RequestError::OutOfRange { offset: raw.offset, length: raw.length, size: cfg.size });
    }
    Ok(ok)
}

/// Something the server must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A valid request. For `WRITE`, `WriteData` events follow.
    Request(Request),
    /// Part of the current write payload, borrowed from the input;
    /// `remaining` bytes are still to come (0 = payload complete).
    WriteData {
        /// The bytes.
        data: &'a [u8],
        /// Payload bytes still expected after these.
        remaining: u32,
    },
    /// An invalid request: send [`Rejection::encode`]. A rejected write's
    /// payload is discarded by the decoder.
    Rejected(Rejection),
    /// `NBD_CMD_DISC`: finish in-flight requests, then close. No reply.
    Disconnect,
}

/// Outcome of one [`RequestDecoder::decode`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// Input bytes used.
    pub consumed: usize,
    /// At most one event; `None` means all input was used and more is needed.
    pub event: Option<Event<'a>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DState {
    Header,
    Payload { remaining: u32 },
    Skip { remaining: u32 },
    Closed,
    Failed(ProtocolViolation),
}

/// Incremental request decoder. See the module docs.
#[derive(Clone, Debug)]
pub struct RequestDecoder {
    cfg: ExportConfig,
    hdr: [u8; REQUEST_HEADER_LEN],
    hdr_len: usize,
    state: DState,
}

impl RequestDecoder {
    /// A decoder for the negotiated export.
    pub fn new(cfg: ExportConfig) -> Self {
        RequestDecoder { cfg, hdr: [0; REQUEST_HEADER_LEN], hdr_len: 0, state: DState::Header }
    }

    /// The export configuration.
    pub fn config(&self) -> &ExportConfig {
        &self.cfg
    }

    /// Write payload bytes still expected for the current request.
    pub fn payload_remaining(&self) -> u32 {
        match self.state {
            DState::Payload { remaining } => remaining,
            _ => 0,
        }
    }

    /// Account for up to `n` write payload bytes the driver read directly
    /// (e.g. straight into a DMA buffer) instead of through `decode`.
    /// Returns how many were accounted.
    pub fn advance_payload(&mut self, n: usize) -> usize {
        let DState::Payload { remaining } = self.state else {
            return 0;
        };
        let take = (remaining as usize).min(n);
        let left = remaining - take as u32;
        self.state = if left == 0 { DState::Header } else { DState::Payload { remaining: left } };
        take
    }

    /// True after `NBD_CMD_DISC`.
    pub fn is_closed(&self) -> bool {
        self.state == DState::Closed
    }

    /// Consume input up to and including the next event.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<Decoded<'a>, ProtocolViolation> {
        let mut pos = 0;
        loop {
            let rest = input.get(pos..).unwrap_or(&[]);
            match self.state {
                DState::Failed(v) => return Err(v),
                DState::Closed => {
                    if rest.is_empty() {
                        return Ok(Decoded { consumed: pos, event: None });
                    }
                    return Err(self.violate(ProtocolViolation::DataAfterDisconnect));
                }
                DState::Skip { remaining } => {
                    let take = (remaining as usize).min(rest.len());
                    pos += take;
                    let left = remaining - take as u32;
                    if left > 0 {
                        self.state = DState::Skip { remaining: left };
                        return Ok(Decoded { consumed: pos, event: None });
                    }
                    self.state = DState::Header;
                }
                DState::Payload { remaining } => {
                    let take = (remaining as usize).min(rest.len());
                    if take == 0 {
                        return Ok(Decoded { consumed: pos, event: None });
                    }
                    let data = rest.get(..take).unwrap_or(&[]);
                    pos += take;
                    let left = remaining - take as u32;
                    self.state = if left == 0 { DState::Header } else { DState::Payload { remaining: left } };
                    let event = Event::WriteData { data, remaining: left };
                    return Ok(Decoded { consumed: pos, event: Some(event) });
                }
                DState::Header => {
                    let take = (REQUEST_HEADER_LEN - self.hdr_len).min(rest.len());
                    if let (Some(dst), Some(src)) =
                        (self.hdr.get_mut(self.hdr_len..self.hdr_len + take), rest.get(..take))
                    {
                        dst.copy_from_slice(src);
                    }
                    self.hdr_len += take;
                    pos += take;
                    if self.hdr_len < REQUEST_HEADER_LEN {
                        return Ok(Decoded { consumed: pos, event: None });
                    }
                    self.hdr_len = 0;
                    let event = self.on_header()?;
                    return Ok(Decoded { consumed: pos, event: Some(event) });
                }
            }
        }
    }

    fn violate(&mut self, v: ProtocolViolation) -> ProtocolViolation {
        self.state = DState::Failed(v);
        v
    }

    fn on_header<'a>(&mut self) -> Result<Event<'a>, ProtocolViolation> {
        let raw = RawRequest::parse(&self.hdr).map_err(|v| self.violate(v))?;
        match validate(&raw, &self.cfg) {
            Ok(req) if req.command == Command::Disc => {
                self.state = DState::Closed;
                Ok(Event::Disconnect)
            }
            Ok(req) => {
                if req.command == Command::Write {
                    self.state = DState::Payload { remaining: req.length };
                }
                Ok(Event::Request(req))
            }
            Err(rej) => {
                if rej.skipped_payload > self.cfg.discard_limit {
                    return Err(self.violate(ProtocolViolation::PayloadTooLarge(rej.skipped_payload)));
                }
                if rej.skipped_payload > 0 {
                    self.state = DState::Skip { remaining: rej.skipped_payload };
                }
                Ok(Event::Rejected(rej))
            }
        }
    }
}

/// Encoding failures (caller bugs, never input-driven panics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// A content chunk must describe at least one byte.
    Empty,
    /// The chunk length would not fit the 32-bit length field.
    TooLong,
}

/// Simple reply header: magic, error (0 = success), cookie. For a
/// successful simple `READ`, the data follows (sent by the caller).
pub fn simple_reply(cookie: Cookie, error: Option<NbdError>) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.map_or(0, NbdError::raw).to_be_bytes());
    b[8..].copy_from_slice(&cookie.0.to_be_bytes());
    b
}

/// Structured reply chunk header; `length` counts the payload after it.
pub fn chunk_header(flags: ReplyFlags, ty: ChunkType, cookie: Cookie, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.bits().to_be_bytes());
    b[6..8].copy_from_slice(&ty.raw().to_be_bytes());
    b[8..16].copy_from_slice(&cookie.0.to_be_bytes());
    b[16..].copy_from_slice(&length.to_be_bytes());
    b
}

fn done_flag(done: bool) -> ReplyFlags {
    if done {
        ReplyFlags::DONE
    } else {
        ReplyFlags::EMPTY
    }
}

/// `NBD_REPLY_TYPE_OFFSET_DATA` chunk header plus the 8-byte offset; the
/// caller sends `data_len` bytes of data right after it.
pub fn offset_data_header(cookie: Cookie, offset: u64, data_len: u32, done: bool) -> Result<[u8; 28], EncodeError> {
    if data_len == 0 {
        return Err(EncodeError::Empty);
    }
    let len = data_len.checked_add(8).ok_or(EncodeError::TooLong)?;
    let mut b = [0u8; 28];
    b[..20].copy_from_slice(&chunk_header(done_flag(done), ChunkType::OffsetData, cookie, len));
    b[20..].copy_from_slice(&offset.to_be_bytes());
    Ok(b)
}

/// Complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (`hole_len` zero bytes).
pub fn offset_hole_chunk(cookie: Cookie, offset: u64, hole_len: u32, done: bool) -> Result<[u8; 32], EncodeError> {
    if hole_len == 0 {
        return Err(EncodeError::Empty);
    }
    let mut b = [0u8; 32];
    b[..20].copy_from_slice(&chunk_header(done_flag(done), ChunkType::OffsetHole, cookie, 12));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..].copy_from_slice(&hole_len.to_be_bytes());
    Ok(b)
}

/// `NBD_REPLY_TYPE_NONE` with `DONE`: the final chunk of a successful reply.
pub fn none_chunk(cookie: Cookie) -> [u8; 20] {
    chunk_header(ReplyFlags::DONE, ChunkType::None, cookie, 0)
}

fn clamp_message(msg: &str) -> &[u8] {
    let mut end = msg.len().min(MAX_STRING_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg.as_bytes().get(..end).unwrap_or(&[])
}

fn error_chunk_with(
    out: &mut Vec<u8>,
    cookie: Cookie,
    error: NbdError,
    message: &str,
    offset: Option<u64>,
    done: bool,
) {
    let msg = clamp_message(message);
    let (ty, extra) = match offset {
        Some(_) => (ChunkType::ErrorOffset, 8),
        None => (ChunkType::Error, 0),
    };
    let len = 6 + msg.len() as u32 + extra;
    out.extend_from_slice(&chunk_header(done_flag(done), ty, cookie, len));
    out.extend_from_slice(&error.raw().to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    if let Some(off) = offset {
        out.extend_from_slice(&off.to_be_bytes());
    }
}

/// Append an `NBD_REPLY_TYPE_ERROR` chunk; `message` is cut to 4096 bytes.
pub fn error_chunk(out: &mut Vec<u8>, cookie: Cookie, error: NbdError, message: &str, done: bool) {
    error_chunk_with(out, cookie, error, message, None, done);
}

/// Append an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk for a failure at `offset`.
pub fn error_offset_chunk(out: &mut Vec<u8>, cookie: Cookie, error: NbdError, message: &str, offset: u64, done: bool) {
    error_chunk_with(out, cookie, error, message, Some(offset), done);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TransmissionFlags as T;

    fn header(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = vec![0x25, 0x60, 0x95, 0x13];
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    fn cfg(flags: TransmissionFlags, structured: bool) -> ExportConfig {
        let bs = BlockSizes::new(512, 4096, 1 << 20).unwrap();
        ExportConfig::new(1 << 30, flags.with(T::HAS_FLAGS), bs, structured)
    }

    fn full() -> TransmissionFlags {
        T::SEND_FLUSH
            | T::SEND_FUA
            | T::SEND_TRIM
            | T::SEND_WRITE_ZEROES
            | T::SEND_FAST_ZERO
            | T::SEND_DF
            | T::SEND_CACHE
    }

    fn check(cfg: &ExportConfig, flags: u16, cmd: u16, off: u64, len: u32) -> Result<(), NbdError> {
        let bytes: [u8; 28] = header(flags, cmd, 7, off, len).try_into().unwrap();
        let raw = RawRequest::parse(&bytes).unwrap();
        validate(&raw, cfg).map(|_| ()).map_err(|r| r.error)
    }

    #[test]
    fn parse_is_byte_exact() {
        let b: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0,
            0x02, 0,
        ];
        let raw = RawRequest::parse(&b).unwrap();
        assert_eq!(
            raw,
            RawRequest {
                flags: CommandFlags::FUA,
                command: 1,
                cookie: Cookie(0x0102_0304_0506_0708),
                offset: 4096,
                length: 512,
            }
        );
        assert_eq!(raw.payload_len(), 512);
        let mut bad = b;
        bad[3] = 0x14;
        assert_eq!(RawRequest::parse(&bad), Err(ProtocolViolation::BadMagic(0x2560_9514)));
    }

    #[test]
    fn every_validation_path() {
        use NbdError::*;
        let s = cfg(full(), true);
        let simple = cfg(full(), false);
        let ro = cfg(full().with(T::READ_ONLY), true);
        let bare = cfg(T::EMPTY, false);
        type Case<'a> = (&'a ExportConfig, u16, u16, u64, u32, Result<(), NbdError>);
        let cases: &[Case<'_>] = &[
            (&s, 0, 0, 0, 4096, Ok(())),
            (&s, 1, 1, 512, 512, Ok(())),
            (&s, 0, 99, 0, 512, Err(Inval)),                 // unknown command
            (&s, 0x40, 0, 0, 512, Err(Inval)),               // unknown flag
            (&s, 0, 2, 5, 5, Ok(())),                        // DISC always accepted
            (&bare, 1, 1, 0, 512, Err(Inval)),               // FUA without SEND_FUA
            (&s, 1, 0, 0, 512, Ok(())),                      // FUA allowed on any command
            (&s, 2, 1, 0, 512, Err(Inval)),                  // NO_HOLE on WRITE
            (&s, 2, 6, 0, 512, Ok(())),                      // NO_HOLE on WRITE_ZEROES
            (&s, 4, 0, 0, 512, Ok(())),                      // DF on structured READ
            (&simple, 4, 0, 0, 512, Err(Inval)),             // DF without structured
            (&s, 4, 1, 0, 512, Err(Inval)),                  // DF on WRITE
            (&s, 8, 7, 0, 512, Err(Inval)),                  // REQ_ONE
            (&s, 16, 6, 0, 512, Ok(())),                     // FAST_ZERO
            (&s, 16, 4, 0, 512, Err(Inval)),                 // FAST_ZERO on TRIM
            (&s, 32, 0, 0, 512, Err(Inval)),                 // PAYLOAD_LEN
            (&bare, 0, 3, 0, 0, Err(Inval)),                 // FLUSH not advertised
            (&bare, 0, 4, 0, 512, Err(Inval)),               // TRIM not advertised
            (&bare, 0, 6, 0, 512, Err(Inval)),               // WRITE_ZEROES not advertised
            (&bare, 0, 5, 0, 512, Err(Inval)),               // CACHE not advertised
            (&s, 0, 5, 0, 512, Ok(())),                      // CACHE advertised
            (&s, 0, 7, 0, 512, Err(Inval)),                  // BLOCK_STATUS
            (&s, 0, 8, 0, 512, Err(Inval)),                  // RESIZE
            (&s, 0, 3, 0, 0, Ok(())),                        // FLUSH
            (&s, 0, 3, 512, 0, Err(Inval)),                  // FLUSH with offset
            (&ro, 0, 1, 0, 512, Err(Perm)),                  // WRITE on read-only
            (&ro, 0, 4, 0, 512, Err(Perm)),                  // TRIM on read-only
            (&ro, 0, 6, 0, 512, Err(Perm)),                  // WRITE_ZEROES on read-only
            (&ro, 0, 0, 0, 512, Ok(())),                     // READ on read-only
            (&s, 0, 0, 0, 0, Err(Inval)),                    // zero-length read
            (&s, 0, 1, 0, 0, Err(Inval)),                    // zero-length write
            (&s, 0, 0, 0, (1 << 20) + 512, Err(Overflow)),   // too large structured read
            (&simple, 0, 0, 0, (1 << 20) + 512, Err(Inval)), // too large simple read
            (&s, 0, 1, 0, (1 << 20) + 512, Err(Inval)),      // too large write
            (&s, 0, 4, 0, 1 << 29, Ok(())),                  // large trim is fine
            (&s, 0, 0, 1, 512, Err(Inval)),                  // misaligned offset
            (&s, 0, 1, 0, 513, Err(Inval)),                  // misaligned length
            (&s, 0, 0, (1 << 30) - 512, 1024, Err(Inval)),   // read past end
            (&s, 0, 1, (1 << 30) - 512, 1024, Err(NoSpc)),   // write past end
            (&s, 0, 6, 1 << 30, 512, Err(NoSpc)),            // write zeroes past end
            (&s, 0, 4, 1 << 30, 512, Err(Inval)),            // trim past end
            (&s, 0, 0, u64::MAX - 511, 1024, Err(Inval)),    // offset+len overflows
            (&s, 0, 1, u64::MAX - 511, 1024, Err(NoSpc)),    // overflowing write
            (&s, 0, 0, (1 << 30) - 512, 512, Ok(())),        // last block
        ];
        for (i, &(c, flags, cmd, off, len, want)) in cases.iter().enumerate() {
            assert_eq!(check(c, flags, cmd, off, len), want, "case {i}");
        }
    }

    #[test]
    fn write_payload_is_delivered_in_order() {
        let mut dec = RequestDecoder::new(cfg(full(), false));
        let mut input = header(0, 1, 42, 0, 1024);
        input.extend((0..1024u32).map(|i| i as u8));
        input.extend(header(0, 3, 43, 0, 0));
        let d = dec.decode(&input[..100]).unwrap();
        assert_eq!(d.consumed, 28);
        assert!(matches!(d.event, Some(Event::Request(r)) if r.length == 1024 && r.cookie == Cookie(42)));
        let d = dec.decode(&input[28..100]).unwrap();
        assert_eq!(d.event, Some(Event::WriteData { data: &input[28..100], remaining: 952 }));
        assert_eq!(dec.payload_remaining(), 952);
        assert_eq!(dec.advance_payload(900), 900);
        let d = dec.decode(&input[1000..]).unwrap();
        assert_eq!(d.event, Some(Event::WriteData { data: &input[1000..1052], remaining: 0 }));
        let d = dec.decode(&input[1052..]).unwrap();
        assert!(matches!(d.event, Some(Event::Request(r)) if r.command == Command::Flush));
        assert_eq!(d.consumed, 28);
    }

    #[test]
    fn rejected_write_payload_is_skipped_and_stream_stays_in_sync() {
        let mut dec = RequestDecoder::new(cfg(full().with(T::READ_ONLY), false));
        let mut input = header(0, 1, 1, 0, 4096);
        input.extend(std::iter::repeat_n(0x25, 4096)); // looks like magic bytes
        input.extend(header(0, 0, 2, 0, 512));
        let d = dec.decode(&input).unwrap();
        let Some(Event::Rejected(rej)) = d.event else { panic!("{d:?}") };
        assert_eq!((rej.error, rej.skipped_payload, rej.cookie), (NbdError::Perm, 4096, Cookie(1)));
        let d2 = dec.decode(&input[d.consumed..]).unwrap();
        assert_eq!(d2.consumed, 4096 + 28);
        assert!(matches!(d2.event, Some(Event::Request(r)) if r.cookie == Cookie(2)));
    }

    #[test]
    fn violations_end_the_connection() {
        let mut dec = RequestDecoder::new(cfg(full(), false));
        let mut bad = header(0, 0, 1, 0, 512);
        bad[0] = 0;
        assert_eq!(dec.decode(&bad), Err(ProtocolViolation::BadMagic(0x0060_9513)));
        assert!(dec.decode(&header(0, 0, 1, 0, 512)).is_err(), "stays failed");

        let mut dec = RequestDecoder::new(cfg(full(), false).with_discard_limit(1 << 21));
        let big = header(0, 1, 1, 0, 1 << 21);
        let d = dec.decode(&big).unwrap();
        assert!(matches!(d.event, Some(Event::Rejected(r)) if r.skipped_payload == 1 << 21));
        let mut dec = RequestDecoder::new(cfg(full(), false).with_discard_limit(1 << 21));
        assert_eq!(dec.decode(&header(0, 1, 1, 0, u32::MAX)), Err(ProtocolViolation::PayloadTooLarge(u32::MAX)));

        let mut dec = RequestDecoder::new(cfg(full(), false));
        let disc = header(0, 2, 9, 0, 0);
        let d = dec.decode(&disc).unwrap();
        assert_eq!(d.event, Some(Event::Disconnect));
        assert!(dec.is_closed());
        assert_eq!(dec.decode(&[]).unwrap().event, None);
        assert_eq!(dec.decode(&[1]), Err(ProtocolViolation::DataAfterDisconnect));
    }

    #[test]
    fn reply_encoders_are_byte_exact() {
        let c = Cookie(0x0102_0304_0506_0708);
        assert_eq!(simple_reply(c, None), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(simple_reply(c, Some(NbdError::NoSpc))[4..8], [0, 0, 0, 28]);
        assert_eq!(
            offset_data_header(c, 4096, 512, true).unwrap(),
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x02, 0x08, 0, 0, 0, 0, 0, 0, 0x10, 0]
        );
        assert_eq!(offset_data_header(c, 0, 0, false), Err(EncodeError::Empty));
        assert_eq!(offset_data_header(c, 0, u32::MAX - 7, false), Err(EncodeError::TooLong));
        assert!(offset_data_header(c, 0, u32::MAX - 8, false).is_ok());
        assert_eq!(none_chunk(c), [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]);
        let hole = offset_hole_chunk(c, 512, 1024, false).unwrap();
        assert_eq!(hole[4..8], [0, 0, 0, 2]);
        assert_eq!(hole[16..], [0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 4, 0]);
        assert_eq!(offset_hole_chunk(c, 0, 0, true), Err(EncodeError::Empty));

        let mut out = Vec::new();
        error_chunk(&mut out, c, NbdError::Io, "bad", true);
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 9, 0, 0, 0, 5, 0, 3, b'b',
                b'a', b'd'
            ]
        );
        out.clear();
        error_offset_chunk(&mut out, c, NbdError::Io, "", 4096, false);
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 0, 0x80, 2, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 14, 0, 0, 0, 5, 0, 0, 0, 0, 0,
                0, 0, 0, 0x10, 0
            ]
        );
        out.clear();
        error_chunk(&mut out, c, NbdError::Io, &"é".repeat(3000), true);
        let msg_len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert_eq!(msg_len, 4096);
        assert_eq!(out.len(), 26 + 4096);
    }

    #[test]
    fn rejection_reply_shape_follows_negotiation() {
        let rej = Rejection {
            cookie: Cookie(5),
            command: 0,
            error: NbdError::Inval,
            reason: RequestError::ZeroLength,
            skipped_payload: 0,
        };
        let mut out = Vec::new();
        rej.encode(false, &mut out);
        assert_eq!(out, simple_reply(Cookie(5), Some(NbdError::Inval)));
        out.clear();
        rej.encode(true, &mut out);
        assert_eq!(out[..8], [0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1]);
        assert_eq!(out[20..24], [0, 0, 0, 22]);
        assert_eq!(&out[26..], b"zero length");
    }
}
