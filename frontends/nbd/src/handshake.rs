//! Server side of the fixed newstyle handshake, as a sans-IO state machine.
//!
//! Implements the spec sections "Newstyle negotiation", "Fixed newstyle
//! negotiation", "Termination of the session during option haggling",
//! "Option types", "Option reply types" and "Size constraints":
//!
//! ```text
//!  new() ── greeting queued ──> AwaitingClientFlags
//!  AwaitingClientFlags ── 32-bit client flags ──> Haggling | Failed
//!  Haggling ── option ──> Haggling             (INFO, LIST, STRUCTURED_REPLY, errors)
//!           ── EXPORT_NAME / GO (success) ──> Negotiated
//!           ── ABORT ──> Aborted               (ACK queued)
//!           ── protocol violation ──> Failed   (hard disconnect)
//! ```
//!
//! The driver calls [`Handshake::feed`] with whatever bytes arrived (any split
//! is fine); it returns how many bytes were consumed. Once the state is
//! terminal, `feed` consumes nothing more: bytes after the final option belong
//! to the transmission phase and must be handed to the request decoder.
//! Replies accumulate in an output buffer, read with [`Handshake::output`]
//! and released with [`Handshake::consume_output`].
//!
//! Memory is bounded: option payloads are only buffered for `EXPORT_NAME`,
//! `INFO` and `GO`, and only up to [`HandshakeConfig::max_option_data`]
//! bytes; other payloads are counted down without being stored, and a
//! payload above [`HandshakeConfig::max_option_skip`] is treated as a denial
//! of service (hard disconnect, as the spec permits).

use std::fmt;
use std::sync::Arc;

use crate::proto::{
    ClientFlags, HandshakeFlags, InfoType, OptionCode, OptionReply, TransmissionFlags, DEFAULT_MAX_PAYLOAD,
    EXPORT_NAME_ZERO_PAD, IHAVEOPT, MAX_STRING_LEN, NBD_MAGIC, OPTION_REPLY_MAGIC,
};
use crate::transmission::ExportConfig;

/// Size constraints of an export ("Size constraints" section). Always valid
/// by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    minimum: u32,
    preferred: u32,
    maximum: u32,
}

impl BlockSizes {
    /// The defaults a server SHOULD support when nothing was advertised:
    /// minimum 1, preferred 4096, maximum payload 2^25.
    pub const DEFAULT: BlockSizes = BlockSizes { minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_PAYLOAD };

    /// Validate constraints: `minimum` a power of two ≤ 64 KiB; `preferred` a
    /// power of two ≥ max(minimum, 512); `maximum` ≥ preferred, a multiple of
    /// `minimum`, and ≤ 2^25 (this server buffers whole payloads).
    pub fn new(minimum: u32, preferred: u32, maximum: u32) -> Result<BlockSizes, &'static str> {
        if !minimum.is_power_of_two() || minimum > 65536 {
            return Err("minimum block size must be a power of two no larger than 65536");
        }
        if !preferred.is_power_of_two() || preferred < minimum.max(512) {
            return Err("preferred block size must be a power of two >= max(minimum, 512)");
        }
        // `minimum` is a power of two (checked above): a mask tests divisibility.
        if maximum < preferred || maximum & (minimum - 1) != 0 || maximum > DEFAULT_MAX_PAYLOAD {
            return Err("maximum payload must be >= preferred, a multiple of minimum, <= 2^25");
        }
        Ok(BlockSizes { minimum, preferred, maximum })
    }
    /// Minimum block size (alignment of offsets and lengths).
    pub fn minimum(&self) -> u32 {
        self.minimum
    }
    /// Preferred block size.
    pub fn preferred(&self) -> u32 {
        self.preferred
    }
    /// Maximum payload size.
    pub fn maximum(&self) -> u32 {
        self.maximum
    }
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes::DEFAULT
    }
}

/// What the catalog knows about one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name (sent as `NBD_INFO_NAME`, listed by `NBD_OPT_LIST`).
    pub name: String,
    /// Human readable description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Features of the export (`READ_ONLY`, `SEND_FLUSH`, `SEND_FUA`, ...).
    /// `HAS_FLAGS` is added, and unsupported bits removed, when sent.
    pub flags: TransmissionFlags,
    /// Size constraints; advertised with `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes: BlockSizes,
}

/// The exports a server offers. Names are UTF-8; `""` is the default export.
pub trait ExportCatalog {
    /// Call `f(name, description)` for every export `NBD_OPT_LIST` shows.
    fn for_each_export(&self, f: &mut dyn FnMut(&str, &str));
    /// Look up one export by the name the client sent.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
}

impl<T: ExportCatalog + ?Sized> ExportCatalog for &T {
    fn for_each_export(&self, f: &mut dyn FnMut(&str, &str)) {
        (**self).for_each_export(f)
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (**self).lookup(name)
    }
}

impl<T: ExportCatalog + ?Sized> ExportCatalog for Arc<T> {
    fn for_each_export(&self, f: &mut dyn FnMut(&str, &str)) {
        (**self).for_each_export(f)
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (**self).lookup(name)
    }
}

/// A fixed list of exports; the empty name selects the first one.
impl ExportCatalog for [ExportInfo] {
    fn for_each_export(&self, f: &mut dyn FnMut(&str, &str)) {
        for e in self {
            f(&e.name, &e.description);
        }
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() {
            return self.first().cloned();
        }
        self.iter().find(|e| e.name == name).cloned()
    }
}

impl ExportCatalog for Vec<ExportInfo> {
    fn for_each_export(&self, f: &mut dyn FnMut(&str, &str)) {
        self.as_slice().for_each_export(f)
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.as_slice().lookup(name)
    }
}

/// Tunables of the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// Drop clients that do not set `NBD_FLAG_C_FIXED_NEWSTYLE`. When false,
    /// such clients get plain newstyle: only `NBD_OPT_EXPORT_NAME` is
    /// accepted and no option replies are ever sent to them.
    pub require_fixed_newstyle: bool,
    /// Largest `INFO`/`GO` payload buffered; larger ones get `ERR_TOO_BIG`.
    /// Also caps `EXPORT_NAME` (with the spec's 4096-byte string limit);
    /// a longer name is a hard disconnect, as that option cannot error.
    pub max_option_data: u32,
    /// Largest option payload read and discarded; larger ones disconnect.
    pub max_option_skip: u32,
    /// Options accepted before the client is deemed abusive (disconnect).
    pub max_options: u32,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            require_fixed_newstyle: true,
            max_option_data: 8192,
            max_option_skip: 65536,
            max_options: 1024,
        }
    }
}

/// Result of a successful negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The export selected (as returned by the catalog).
    pub export: ExportInfo,
    /// Transmission flags exactly as sent to the client.
    pub transmission_flags: TransmissionFlags,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured_replies: bool,
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
    /// Ended by `NBD_OPT_GO` (true) or `NBD_OPT_EXPORT_NAME` (false).
    pub via_go: bool,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in its `NBD_OPT_GO`, so it
    /// promised to honour the size constraints.
    pub block_sizes_requested: bool,
}

impl Negotiated {
    /// Canonical name of the selected export.
    pub fn export_name(&self) -> &str {
        &self.export.name
    }
    /// Parameters for the transmission-phase request decoder.
    pub fn export_config(&self) -> ExportConfig {
        ExportConfig::new(self.export.size, self.transmission_flags, self.export.block_sizes, self.structured_replies)
    }
}

/// Why a handshake ended in a hard disconnect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client set flags the server does not know (spec: MUST drop).
    UnknownClientFlags(u32),
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE` and the
    /// configuration requires it.
    FixedNewstyleRequired,
    /// An option did not start with `IHAVEOPT`.
    BadOptionMagic(u64),
    /// An option payload too large to read, or an oversized export name.
    OptionTooLarge {
        /// Option code.
        option: u32,
        /// Announced payload length.
        length: u32,
    },
    /// More options than [`HandshakeConfig::max_options`].
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` with a name that is not a valid string.
    InvalidExportName,
    /// `NBD_OPT_EXPORT_NAME` for an export that does not exist (it cannot be
    /// answered with an error, so the session MUST be terminated).
    UnknownExport(String),
    /// A plain (non-fixed) newstyle client sent an option other than
    /// `NBD_OPT_EXPORT_NAME`.
    OptionWithoutFixedNewstyle(u32),
    /// `NBD_OPT_EXPORT_NAME` arrived after [`Handshake::begin_shutdown`].
    ShuttingDown,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::UnknownClientFlags(b) => write!(f, "unknown client flags {b:#x}"),
            HandshakeError::FixedNewstyleRequired => write!(f, "client lacks fixed newstyle"),
            HandshakeError::BadOptionMagic(m) => write!(f, "bad option magic {m:#x}"),
            HandshakeError::OptionTooLarge { option, length } => {
                write!(f, "option {option} payload of {length} bytes is too large")
            }
            HandshakeError::TooManyOptions => write!(f, "too many options"),
            HandshakeError::InvalidExportName => write!(f, "export name is not a valid string"),
            HandshakeError::UnknownExport(n) => write!(f, "unknown export {n:?}"),
            HandshakeError::OptionWithoutFixedNewstyle(o) => {
                write!(f, "option {o} sent without fixed newstyle")
            }
            HandshakeError::ShuttingDown => write!(f, "server is shutting down"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// Where the handshake stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeState {
    /// Greeting queued; waiting for the 32-bit client flags.
    AwaitingClientFlags,
    /// Option haggling.
    Haggling,
    /// Transmission phase may start (after the output is flushed).
    Negotiated(Negotiated),
    /// Client sent `NBD_OPT_ABORT`; flush the ACK, then close.
    Aborted,
    /// Protocol violation or unsatisfiable request: hard disconnect.
    Failed(HandshakeError),
}

#[derive(Clone, Copy, Debug)]
enum Rx {
    ClientFlags,
    OptHeader,
    /// Buffering `len` bytes of payload for `opt` into `self.data`.
    OptData {
        opt: u32,
        len: u32,
    },
    /// Discarding payload, then answering with an error reply.
    Skip {
        opt: u32,
        remaining: u32,
        reply: OptionReply,
        msg: &'static str,
    },
    Done,
}

/// The server half of the handshake. See the module docs.
pub struct Handshake<C> {
    catalog: C,
    config: HandshakeConfig,
    state: HandshakeState,
    rx: Rx,
    hdr: [u8; 16],
    hdr_len: usize,
    data: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    shutting_down: bool,
    options_seen: u32,
}

/// Flags this server sends in the greeting.
pub const SERVER_HANDSHAKE_FLAGS: HandshakeFlags = HandshakeFlags::ALL;

/// Transmission flags this crate knows how to honour.
const SUPPORTED_TX_FLAGS: TransmissionFlags =
    TransmissionFlags::ALL.without(TransmissionFlags::SEND_RESIZE).without(TransmissionFlags::BLOCK_STATUS_PAYLOAD);

fn effective_flags(flags: TransmissionFlags, structured: bool) -> TransmissionFlags {
    let mut f = TransmissionFlags(flags.bits() & SUPPORTED_TX_FLAGS.bits()).with(TransmissionFlags::HAS_FLAGS);
    if !structured {
        f = f.without(TransmissionFlags::SEND_DF);
    }
    if !f.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
        f = f.without(TransmissionFlags::SEND_FAST_ZERO);
    }
    f
}

/// Longest prefix of `s` that is at most [`MAX_STRING_LEN`] bytes.
fn clamp_str(s: &str) -> &str {
    let mut end = s.len().min(MAX_STRING_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// Append one fixed-newstyle option reply (header + concatenated `parts`).
fn push_reply(out: &mut Vec<u8>, opt: u32, ty: OptionReply, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&ty.raw().to_be_bytes());
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

fn parse_string(bytes: &[u8]) -> Option<&str> {
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A parsed `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
struct InfoRequest<'a> {
    name: &'a str,
    /// Bit `1 << InfoType::raw()` for each known type requested.
    wanted: u8,
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, (OptionReply, &'static str)> {
    let invalid = |m| Err((OptionReply::ErrInvalid, m));
    let Some(name_len) = be_u32(data, 0) else {
        return invalid("option data shorter than 6 bytes");
    };
    let name_end = match usize::try_from(name_len).ok().and_then(|n| n.checked_add(4)) {
        Some(e) if e.checked_add(2).is_some_and(|n| n <= data.len()) => e,
        _ => return invalid("name length exceeds option length - 6"),
    };
    let name_bytes = data.get(4..name_end).unwrap_or(&[]);
    if name_bytes.len() > MAX_STRING_LEN {
        return Err((OptionReply::ErrTooBig, "export name longer than 4096 bytes"));
    }
    let Some(name) = parse_string(name_bytes) else {
        return invalid("export name is not valid UTF-8 or contains NUL");
    };
    let count = be_u16(data, name_end).unwrap_or(0);
    let list = data.get(name_end + 2..).unwrap_or(&[]);
    if list.len() != usize::from(count) * 2 {
        return invalid("information request count does not match option length");
    }
    let mut wanted = 0u8;
    for pair in list.chunks_exact(2) {
        let raw = u16::from_be_bytes([pair[0], pair[1]]);
        if let Some(t) = InfoType::from_raw(raw) {
            wanted |= 1 << t.raw();
        }
    }
    Ok(InfoRequest { name, wanted })
}

impl<C: ExportCatalog> Handshake<C> {
    /// Start a handshake with default configuration; the greeting is queued.
    pub fn new(catalog: C) -> Self {
        Self::with_config(catalog, HandshakeConfig::default())
    }

    /// Start a handshake; the 18-byte greeting is queued in the output.
    pub fn with_config(catalog: C, config: HandshakeConfig) -> Self {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&SERVER_HANDSHAKE_FLAGS.bits().to_be_bytes());
        Handshake {
            catalog,
            config,
            state: HandshakeState::AwaitingClientFlags,
            rx: Rx::ClientFlags,
            hdr: [0; 16],
            hdr_len: 0,
            data: Vec::new(),
            out,
            out_pos: 0,
            fixed: false,
            no_zeroes: false,
            structured: false,
            shutting_down: false,
            options_seen: 0,
        }
    }

    /// Current state.
    pub fn state(&self) -> &HandshakeState {
        &self.state
    }

    /// True once the state is `Negotiated`, `Aborted` or `Failed`.
    pub fn is_finished(&self) -> bool {
        matches!(self.rx, Rx::Done)
    }

    /// Bytes waiting to be sent to the client.
    pub fn output(&self) -> &[u8] {
        self.out.get(self.out_pos..).unwrap_or(&[])
    }

    /// Mark `n` bytes of [`output`](Self::output) as sent.
    pub fn consume_output(&mut self, n: usize) {
        self.out_pos = self.out_pos.saturating_add(n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
    }

    /// The server is shutting down: answer further options (except
    /// `NBD_OPT_ABORT`) with `NBD_REP_ERR_SHUTDOWN`.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Bytes currently reserved for buffering option payloads; never more
    /// than [`HandshakeConfig::max_option_data`].
    pub fn input_buffer_capacity(&self) -> usize {
        self.data.capacity()
    }

    /// Consume bytes from the client; returns how many were used. Stops at
    /// the end of the final option, so trailing bytes stay with the caller.
    pub fn feed(&mut self, input: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            let rest = input.get(pos..).unwrap_or(&[]);
            match self.rx {
                Rx::Done => break,
                Rx::ClientFlags => {
                    let Some(h) = self.fill_header(rest, 4, &mut pos) else {
                        break;
                    };
                    self.on_client_flags(ClientFlags(u32::from_be_bytes([h[0], h[1], h[2], h[3]])));
                }
                Rx::OptHeader => {
                    let Some(h) = self.fill_header(rest, 16, &mut pos) else {
                        break;
                    };
                    let magic = be_u64(&h, 0).unwrap_or(0);
                    let opt = be_u32(&h, 8).unwrap_or(0);
                    let len = be_u32(&h, 12).unwrap_or(0);
                    self.on_option_header(magic, opt, len);
                }
                Rx::OptData { opt, len } => {
                    let want = (len as usize).saturating_sub(self.data.len());
                    let take = want.min(rest.len());
                    self.data.extend_from_slice(rest.get(..take).unwrap_or(&[]));
                    pos += take;
                    if take < want {
                        break;
                    }
                    self.rx = Rx::OptHeader;
                    self.on_option_data(opt);
                }
                Rx::Skip { opt, remaining, reply, msg } => {
                    let take = (remaining as usize).min(rest.len());
                    pos += take;
                    let left = remaining - take as u32;
                    if left > 0 {
                        self.rx = Rx::Skip { opt, remaining: left, reply, msg };
                        break;
                    }
                    self.reply(opt, reply, &[msg.as_bytes()]);
                    self.rx = Rx::OptHeader;
                }
            }
        }
        pos
    }

    fn fill_header(&mut self, rest: &[u8], need: usize, pos: &mut usize) -> Option<[u8; 16]> {
        let take = need.saturating_sub(self.hdr_len).min(rest.len());
        let dst = self.hdr.get_mut(self.hdr_len..self.hdr_len + take)?;
        dst.copy_from_slice(rest.get(..take)?);
        self.hdr_len += take;
        *pos += take;
        if self.hdr_len < need {
            return None;
        }
        self.hdr_len = 0;
        Some(self.hdr)
    }

    fn fail(&mut self, err: HandshakeError) {
        log::debug!("nbd handshake failed: {err}");
        self.state = HandshakeState::Failed(err);
        self.rx = Rx::Done;
        self.data = Vec::new();
    }

    fn on_client_flags(&mut self, flags: ClientFlags) {
        if flags.unknown_bits() != 0 {
            return self.fail(HandshakeError::UnknownClientFlags(flags.bits()));
        }
        self.fixed = flags.contains(ClientFlags::FIXED_NEWSTYLE);
        self.no_zeroes = flags.contains(ClientFlags::NO_ZEROES);
        if !self.fixed && self.config.require_fixed_newstyle {
            return self.fail(HandshakeError::FixedNewstyleRequired);
        }
        self.state = HandshakeState::Haggling;
        self.rx = Rx::OptHeader;
    }

    fn reply(&mut self, opt: u32, ty: OptionReply, parts: &[&[u8]]) {
        push_reply(&mut self.out, opt, ty, parts);
    }

    /// Discard `len` payload bytes, then answer `reply` with message `msg`.
    fn skip_then(&mut self, opt: u32, len: u32, reply: OptionReply, msg: &'static str) {
        if len > self.config.max_option_skip {
            return self.fail(HandshakeError::OptionTooLarge { option: opt, length: len });
        }
        self.rx = Rx::Skip { opt, remaining: len, reply, msg };
    }

    fn on_option_header(&mut self, magic: u64, opt: u32, len: u32) {
        if magic != IHAVEOPT {
            return self.fail(HandshakeError::BadOptionMagic(magic));
        }
        self.options_seen += 1;
        if self.options_seen > self.config.max_options {
            return self.fail(HandshakeError::TooManyOptions);
        }
        let code = OptionCode::from_raw(opt);
        if !self.fixed && code != Some(OptionCode::ExportName) {
            return self.fail(HandshakeError::OptionWithoutFixedNewstyle(opt));
        }
        if self.shutting_down && !matches!(code, Some(OptionCode::Abort | OptionCode::ExportName)) {
            return self.skip_then(opt, len, OptionReply::ErrShutdown, "server is shutting down");
        }
        self.rx = Rx::OptHeader;
        match code {
            Some(OptionCode::Abort) => {
                // Data SHOULD be ignored; the session is over, so do not wait for it.
                self.reply(opt, OptionReply::Ack, &[]);
                self.state = HandshakeState::Aborted;
                self.rx = Rx::Done;
            }
            // EXPORT_NAME cannot be answered with an error: disconnect instead.
            Some(OptionCode::ExportName) if self.shutting_down => self.fail(HandshakeError::ShuttingDown),
            Some(OptionCode::ExportName) if len as usize > MAX_STRING_LEN || len > self.config.max_option_data => {
                self.fail(HandshakeError::OptionTooLarge { option: opt, length: len })
            }
            Some(OptionCode::Info | OptionCode::Go) if len > self.config.max_option_data => {
                self.skip_then(opt, len, OptionReply::ErrTooBig, "option data too large")
            }
            Some(OptionCode::ExportName | OptionCode::Info | OptionCode::Go) => {
                self.data.clear();
                self.data.reserve_exact(len as usize);
                self.rx = Rx::OptData { opt, len };
            }
            Some(OptionCode::List | OptionCode::StructuredReply | OptionCode::StartTls) if len != 0 => {
                self.skip_then(opt, len, OptionReply::ErrInvalid, "option takes no data")
            }
            Some(OptionCode::List) => self.on_list(opt),
            Some(OptionCode::StructuredReply) => {
                self.structured = true;
                self.reply(opt, OptionReply::Ack, &[]);
            }
            Some(OptionCode::StartTls) => {
                self.reply(opt, OptionReply::ErrUnsup, &[b"TLS is not supported"]);
            }
            _ => self.skip_then(opt, len, OptionReply::ErrUnsup, "option not supported"),
        }
    }

    fn on_list(&mut self, opt: u32) {
        let out = &mut self.out;
        self.catalog.for_each_export(&mut |name, desc| {
            let (name, desc) = (clamp_str(name), clamp_str(desc));
            let name_len = (name.len() as u32).to_be_bytes();
            push_reply(out, opt, OptionReply::Server, &[&name_len, name.as_bytes(), desc.as_bytes()]);
        });
        self.reply(opt, OptionReply::Ack, &[]);
    }

    fn on_option_data(&mut self, opt: u32) {
        let data = std::mem::take(&mut self.data);
        match OptionCode::from_raw(opt) {
            Some(OptionCode::ExportName) => self.on_export_name(&data),
            Some(code @ (OptionCode::Info | OptionCode::Go)) => match parse_info_request(&data) {
                Ok(req) => self.on_info(opt, code == OptionCode::Go, &req),
                Err((reply, msg)) => self.reply(opt, reply, &[msg.as_bytes()]),
            },
            _ => self.reply(opt, OptionReply::ErrUnsup, &[]),
        }
        if !matches!(self.rx, Rx::Done) {
            self.data = data; // keep the allocation for the next option
        }
    }

    fn on_export_name(&mut self, data: &[u8]) {
        let Some(name) = parse_string(data) else {
            return self.fail(HandshakeError::InvalidExportName);
        };
        let Some(export) = self.catalog.lookup(name) else {
            return self.fail(HandshakeError::UnknownExport(name.to_owned()));
        };
        let flags = effective_flags(export.flags, self.structured);
        self.out.extend_from_slice(&export.size.to_be_bytes());
        self.out.extend_from_slice(&flags.bits().to_be_bytes());
        if !self.no_zeroes {
            self.out.extend_from_slice(&[0u8; EXPORT_NAME_ZERO_PAD]);
        }
        self.finish(export, flags, false, false);
    }

    fn on_info(&mut self, opt: u32, go: bool, req: &InfoRequest<'_>) {
        let Some(export) = self.catalog.lookup(req.name) else {
            return self.reply(opt, OptionReply::ErrUnknown, &[b"unknown export"]);
        };
        let wants = |t: InfoType| req.wanted & (1 << t.raw()) != 0;
        let flags = effective_flags(export.flags, self.structured);
        let info = |t: InfoType| t.raw().to_be_bytes();
        self.reply(
            opt,
            OptionReply::Info,
            &[&info(InfoType::Export), &export.size.to_be_bytes(), &flags.bits().to_be_bytes()],
        );
        if wants(InfoType::Name) {
            let name = clamp_str(&export.name).as_bytes();
            self.reply(opt, OptionReply::Info, &[&info(InfoType::Name), name]);
        }
        if wants(InfoType::Description) && !export.description.is_empty() {
            let desc = clamp_str(&export.description).as_bytes();
            self.reply(opt, OptionReply::Info, &[&info(InfoType::Description), desc]);
        }
        // Non-default constraints are always advertised (spec: SHOULD).
        let bs = export.block_sizes;
        if wants(InfoType::BlockSize) || bs != BlockSizes::DEFAULT {
            self.reply(
                opt,
                OptionReply::Info,
                &[
                    &info(InfoType::BlockSize),
                    &bs.minimum().to_be_bytes(),
                    &bs.preferred().to_be_bytes(),
                    &bs.maximum().to_be_bytes(),
                ],
            );
        }
        self.reply(opt, OptionReply::Ack, &[]);
        if go {
            self.finish(export, flags, true, wants(InfoType::BlockSize));
        }
    }

    fn finish(&mut self, export: ExportInfo, flags: TransmissionFlags, go: bool, bs: bool) {
        self.state = HandshakeState::Negotiated(Negotiated {
            export,
            transmission_flags: flags,
            structured_replies: self.structured,
            no_zeroes: self.no_zeroes,
            via_go: go,
            block_sizes_requested: bs,
        });
        self.rx = Rx::Done;
        self.data = Vec::new();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proto::OptionCode as O;
    use crate::proto::OptionReply as R;

    pub(crate) fn catalog() -> Vec<ExportInfo> {
        vec![
            ExportInfo {
                name: "disk0".into(),
                description: "cached volume".into(),
                size: 0x1_0000_0000,
                flags: TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA | TransmissionFlags::SEND_DF,
                block_sizes: BlockSizes::DEFAULT,
            },
            ExportInfo {
                name: "ro".into(),
                description: String::new(),
                size: 1 << 20,
                flags: TransmissionFlags::READ_ONLY | TransmissionFlags::SEND_RESIZE,
                block_sizes: BlockSizes::new(512, 4096, 1 << 20).unwrap(),
            },
        ]
    }

    pub(crate) fn opt(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = b"IHAVEOPT".to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    pub(crate) fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    fn rep(code: u32, ty: R, data: &[u8]) -> Vec<u8> {
        let mut v = vec![0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&ty.raw().to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// A handshake past the client flags, with the greeting drained.
    fn started(flags: u32) -> Handshake<Vec<ExportInfo>> {
        let mut hs = Handshake::new(catalog());
        let greeting = hs.output().to_vec();
        hs.consume_output(greeting.len());
        assert_eq!(hs.feed(&flags.to_be_bytes()), 4);
        hs
    }

    fn run(hs: &mut Handshake<Vec<ExportInfo>>, input: &[u8]) -> Vec<u8> {
        assert_eq!(hs.feed(input), input.len(), "all input consumed");
        let out = hs.output().to_vec();
        hs.consume_output(out.len());
        out
    }

    fn negotiated(hs: &Handshake<Vec<ExportInfo>>) -> &Negotiated {
        match hs.state() {
            HandshakeState::Negotiated(n) => n,
            s => panic!("not negotiated: {s:?}"),
        }
    }

    #[test]
    fn greeting_is_byte_exact() {
        let hs = Handshake::new(catalog());
        assert_eq!(hs.output(), b"NBDMAGICIHAVEOPT\x00\x03");
        assert_eq!(hs.state(), &HandshakeState::AwaitingClientFlags);
    }

    #[test]
    fn client_flags() {
        let mut hs = Handshake::new(catalog());
        assert_eq!(hs.feed(&[0, 0, 0, 4]), 4);
        assert_eq!(hs.state(), &HandshakeState::Failed(HandshakeError::UnknownClientFlags(4)));
        assert_eq!(hs.feed(b"more"), 0, "nothing consumed after failure");

        let mut hs = Handshake::new(catalog());
        hs.feed(&[0, 0, 0, 2]);
        assert_eq!(hs.state(), &HandshakeState::Failed(HandshakeError::FixedNewstyleRequired));

        let hs = started(1);
        assert_eq!(hs.state(), &HandshakeState::Haggling);
    }

    #[test]
    fn plain_newstyle_client_when_allowed() {
        let cfg = HandshakeConfig { require_fixed_newstyle: false, ..HandshakeConfig::default() };
        let mut hs = Handshake::with_config(catalog(), cfg);
        hs.feed(&[0, 0, 0, 0]);
        let mut input = opt(1, b"disk0");
        input.extend_from_slice(b"trailing");
        assert_eq!(hs.feed(&input), input.len() - 8);
        assert_eq!(hs.output().len(), 18 + 8 + 2 + 124);
        assert!(!negotiated(&hs).no_zeroes);

        let mut hs = Handshake::with_config(catalog(), cfg);
        hs.feed(&[0, 0, 0, 0]);
        hs.feed(&opt(3, b""));
        assert_eq!(hs.state(), &HandshakeState::Failed(HandshakeError::OptionWithoutFixedNewstyle(3)));
        assert_eq!(hs.output().len(), 18, "no option reply to a plain newstyle client");
    }

    #[test]
    fn export_name_byte_exact_with_and_without_zeroes() {
        let mut hs = started(1);
        let out = run(&mut hs, &opt(1, b"disk0"));
        let mut want = vec![0, 0, 0, 1, 0, 0, 0, 0, 0x00, 0x0d];
        want.extend_from_slice(&[0; 124]);
        assert_eq!(out, want);
        let n = negotiated(&hs);
        assert!(!n.via_go && !n.structured_replies && !n.no_zeroes);
        assert_eq!(n.export_name(), "disk0");

        let mut hs = started(3);
        let out = run(&mut hs, &opt(1, b""));
        assert_eq!(out, [0, 0, 0, 1, 0, 0, 0, 0, 0x00, 0x0d], "default export, no zeroes");
        assert!(negotiated(&hs).no_zeroes);
    }

    #[test]
    fn export_name_failures() {
        let mut hs = started(1);
        run(&mut hs, &opt(1, b"nope"));
        assert_eq!(hs.state(), &HandshakeState::Failed(HandshakeError::UnknownExport("nope".into())));
        let mut hs = started(1);
        run(&mut hs, &opt(1, b"a\0b"));
        assert_eq!(hs.state(), &HandshakeState::Failed(HandshakeError::InvalidExportName));
        let mut hs = started(1);
        let mut big = b"IHAVEOPT\0\0\0\x01".to_vec();
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        run(&mut hs, &big);
        assert_eq!(hs.state(), &HandshakeState::Failed(HandshakeError::OptionTooLarge { option: 1, length: u32::MAX }));
        assert_eq!(hs.input_buffer_capacity(), 0, "absurd length never allocated");
    }

    #[test]
    fn export_name_respects_small_max_option_data() {
        // Regression (found by the nbd_handshake fuzz target): the name was
        // buffered up to 4096 bytes even when max_option_data was smaller.
        let cfg = HandshakeConfig { max_option_data: 512, ..HandshakeConfig::default() };
        let mut hs = Handshake::with_config(catalog(), cfg);
        hs.feed(&[0, 0, 0, 1]);
        hs.feed(&opt(1, &[b'a'; 1032]));
        assert!(hs.input_buffer_capacity() <= 512);
        assert_eq!(hs.state(), &HandshakeState::Failed(HandshakeError::OptionTooLarge { option: 1, length: 1032 }));
    }

    #[test]
    fn go_byte_exact_with_all_infos() {
        let mut hs = started(1);
        let out = run(&mut hs, &opt(7, &go_data("disk0", &[1, 2, 3, 0, 99])));
        let mut want = rep(7, R::Info, &[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x00, 0x0d]);
        want.extend(rep(7, R::Info, b"\x00\x01disk0"));
        want.extend(rep(7, R::Info, b"\x00\x02cached volume"));
        want.extend(rep(7, R::Info, &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]));
        want.extend(rep(7, R::Ack, b""));
        assert_eq!(out, want);
        let n = negotiated(&hs);
        assert!(n.via_go && n.block_sizes_requested);
        // SEND_DF dropped: structured replies were not negotiated.
        assert_eq!(n.transmission_flags.bits(), 0x0d);
    }

    #[test]
    fn go_advertises_non_default_block_sizes_and_masks_flags() {
        let mut hs = started(1);
        let out = run(&mut hs, &opt(7, &go_data("ro", &[])));
        let mut want = rep(7, R::Info, &[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x00, 0x03]);
        want.extend(rep(7, R::Info, &[0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0, 0x10, 0, 0]));
        want.extend(rep(7, R::Ack, b""));
        assert_eq!(out, want);
        let n = negotiated(&hs);
        assert!(!n.block_sizes_requested);
        assert_eq!(n.export_config().block_sizes().minimum(), 512);
    }

    #[test]
    fn info_then_structured_then_go() {
        let mut hs = started(1);
        let out = run(&mut hs, &opt(6, &go_data("disk0", &[])));
        assert_eq!(out.len(), 20 + 12 + 20);
        assert_eq!(hs.state(), &HandshakeState::Haggling);
        assert_eq!(run(&mut hs, &opt(8, b"")), rep(8, R::Ack, b""));
        let out = run(&mut hs, &opt(7, &go_data("disk0", &[])));
        assert_eq!(out.get(20..32), Some(&[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0x8d][..]));
        let n = negotiated(&hs);
        assert!(n.structured_replies);
        assert!(n.transmission_flags.contains(TransmissionFlags::SEND_DF));
    }

    #[test]
    fn go_errors_keep_haggling() {
        let mut hs = started(1);
        let cases: Vec<(Vec<u8>, R)> = vec![
            (go_data("nope", &[]), R::ErrUnknown),
            (vec![0, 0, 0], R::ErrInvalid),
            (vec![0, 0, 0, 9, b'd', 0, 0], R::ErrInvalid),
            (vec![0xff, 0xff, 0xff, 0xff, 0, 0], R::ErrInvalid),
            (go_data("disk0", &[1])[..11].to_vec(), R::ErrInvalid),
            ([go_data("disk0", &[]), vec![0]].concat(), R::ErrInvalid),
            (go_data("\u{0}x", &[]), R::ErrInvalid),
            (go_data(&"x".repeat(5000), &[]), R::ErrTooBig),
            (vec![0; 9000], R::ErrTooBig),
        ];
        for (data, want) in cases {
            let out = run(&mut hs, &opt(7, &data));
            assert_eq!(out.get(12..16), Some(&want.raw().to_be_bytes()[..]), "{data:?}");
            assert_eq!(hs.state(), &HandshakeState::Haggling);
        }
        assert!(hs.input_buffer_capacity() <= 8192);
        run(&mut hs, &opt(7, &go_data("disk0", &[])));
        assert!(matches!(hs.state(), HandshakeState::Negotiated(_)));
    }

    #[test]
    fn list_byte_exact() {
        let mut hs = started(1);
        let out = run(&mut hs, &opt(3, b""));
        let mut want = rep(3, R::Server, b"\x00\x00\x00\x05disk0cached volume");
        want.extend(rep(3, R::Server, b"\x00\x00\x00\x02ro"));
        want.extend(rep(3, R::Ack, b""));
        assert_eq!(out, want);
        let out = run(&mut hs, &opt(3, b"xyz"));
        assert_eq!(out, rep(3, R::ErrInvalid, b"option takes no data"));
    }

    #[test]
    fn abort_acks_and_stops() {
        let mut hs = started(1);
        let input = [opt(2, b""), opt(3, b"")].concat();
        assert_eq!(hs.feed(&input), 16);
        assert_eq!(hs.output(), rep(2, R::Ack, b"").as_slice());
        assert_eq!(hs.state(), &HandshakeState::Aborted);
        assert!(hs.is_finished());
    }

    #[test]
    fn starttls_unknown_and_unsupported_options() {
        let mut hs = started(1);
        assert_eq!(run(&mut hs, &opt(5, b"")), rep(5, R::ErrUnsup, b"TLS is not supported"));
        assert_eq!(run(&mut hs, &opt(5, b"x")), rep(5, R::ErrInvalid, b"option takes no data"));
        assert_eq!(run(&mut hs, &opt(8, b"x")), rep(8, R::ErrInvalid, b"option takes no data"));
        for code in [4, 9, 10, 11, 0, 12, 0xdead_beef] {
            let out = run(&mut hs, &opt(code, &[7; 100]));
            assert_eq!(out, rep(code, R::ErrUnsup, b"option not supported"));
        }
        assert_eq!(hs.state(), &HandshakeState::Haggling);
        // A skipped payload larger than the skip limit is a hard disconnect.
        let mut big = b"IHAVEOPT\0\0\0\x0a".to_vec();
        big.extend_from_slice(&0x10_0000u32.to_be_bytes());
        run(&mut hs, &big);
        assert!(matches!(hs.state(), HandshakeState::Failed(HandshakeError::OptionTooLarge { option: 10, .. })));
    }

    #[test]
    fn bad_magic_and_too_many_options() {
        let mut hs = started(1);
        let mut bad = opt(3, b"");
        bad[0] = b'X';
        run(&mut hs, &bad);
        assert!(matches!(hs.state(), HandshakeState::Failed(HandshakeError::BadOptionMagic(_))));

        let cfg = HandshakeConfig { max_options: 3, ..HandshakeConfig::default() };
        let mut hs = Handshake::with_config(catalog(), cfg);
        hs.feed(&[0, 0, 0, 1]);
        let input = opt(O::StructuredReply.raw(), b"").repeat(5);
        assert_eq!(hs.feed(&input), 64);
        assert_eq!(hs.state(), &HandshakeState::Failed(HandshakeError::TooManyOptions));
    }

    #[test]
    fn shutdown_errors_options_but_allows_abort() {
        let mut hs = started(1);
        hs.begin_shutdown();
        let out = run(&mut hs, &opt(7, &go_data("disk0", &[])));
        assert_eq!(out, rep(7, R::ErrShutdown, b"server is shutting down"));
        run(&mut hs, &opt(2, b""));
        assert_eq!(hs.state(), &HandshakeState::Aborted);
        let mut hs = started(1);
        hs.begin_shutdown();
        assert_eq!(hs.feed(&opt(1, b"disk0")), 16, "name left unread");
        assert_eq!(hs.state(), &HandshakeState::Failed(HandshakeError::ShuttingDown));
    }

    #[test]
    fn go_leaves_transmission_bytes_unconsumed() {
        let mut hs = started(1);
        let go = opt(7, &go_data("disk0", &[]));
        let input = [go.clone(), vec![0x25, 0x60, 0x95, 0x13]].concat();
        assert_eq!(hs.feed(&input), go.len());
        assert_eq!(hs.feed(&input[go.len()..]), 0);
    }

    #[test]
    fn block_sizes_validation() {
        assert!(BlockSizes::new(512, 4096, 1 << 25).is_ok());
        assert!(BlockSizes::new(3, 4096, 1 << 20).is_err());
        assert!(BlockSizes::new(1 << 17, 1 << 17, 1 << 20).is_err());
        assert!(BlockSizes::new(1, 256, 1 << 20).is_err());
        assert!(BlockSizes::new(4096, 2048, 1 << 20).is_err());
        assert!(BlockSizes::new(512, 4096, 2048).is_err());
        assert!(BlockSizes::new(512, 4096, 4097).is_err());
        assert!(BlockSizes::new(512, 4096, (1 << 25) + 512).is_err());
    }

    #[test]
    fn output_draining_is_partial_safe() {
        let mut hs = Handshake::new(catalog());
        hs.consume_output(5);
        assert_eq!(hs.output(), b"GICIHAVEOPT\x00\x03");
        hs.consume_output(usize::MAX);
        assert!(hs.output().is_empty());
    }
}
