//! tiercache-nbd: the NBD frontend of tiercache.
//!
//! * [`server`]: the NBD server ([`NbdServer`]) running on the engine's
//!   reactors: io_uring listeners and connections, exports over bdevs.
//! * The protocol itself, below, as pure synchronous state machines.
//!
//! Nothing in the protocol modules touches a socket, a reactor or a bdev. The server glue feeds
//! bytes in and gets typed events and bytes to send out; every state machine
//! accepts its input split at any byte boundary, never panics on any input,
//! and bounds what it buffers. Wire format and semantics follow the NBD
//! protocol specification, `doc/proto.md` of the NetworkBlockDevice project
//! (section names are cited in each module).
//!
//! * [`proto`]: every wire constant as typed values ("Values" section), and
//!   the errno → NBD error mapping ("Error values").
//! * [`handshake`]: the server side of the *fixed newstyle* negotiation
//!   ("Newstyle negotiation", "Fixed newstyle negotiation", "Option types",
//!   "Option reply types", "Size constraints"). [`Handshake::feed`] takes
//!   client bytes; replies queue in [`Handshake::output`]; it ends in
//!   [`HandshakeState::Negotiated`], [`HandshakeState::Aborted`] or
//!   [`HandshakeState::Failed`].
//! * [`transmission`]: request decoding ("Request message", "Request
//!   types", "Command flags") with validation against the export, and
//!   header-only reply encoders ("Simple reply message", "Structured reply
//!   chunk message", "Structured reply types").
//!
//! A connection is driven like this:
//!
//! ```
//! use tiercache_nbd::*;
//!
//! let exports = vec![ExportInfo {
//!     name: "disk0".into(),
//!     description: String::new(),
//!     size: 1 << 20,
//!     flags: TransmissionFlags::SEND_FLUSH,
//!     block_sizes: BlockSizes::DEFAULT,
//! }];
//! let mut hs = Handshake::new(&exports);
//! let greeting = hs.output().len(); // send these bytes, then:
//! hs.consume_output(greeting);
//!
//! // Client flags (FIXED_NEWSTYLE | NO_ZEROES), then NBD_OPT_EXPORT_NAME "disk0",
//! // then a first transmission request already pipelined behind it.
//! let mut wire = vec![0, 0, 0, 3];
//! wire.extend_from_slice(b"IHAVEOPT\x00\x00\x00\x01\x00\x00\x00\x05disk0");
//! let request_start = wire.len();
//! wire.extend_from_slice(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 3]);
//! wire.extend_from_slice(&[0; 20]); // NBD_CMD_FLUSH, cookie 0
//!
//! let used = hs.feed(&wire);
//! assert_eq!(used, request_start);
//! let HandshakeState::Negotiated(n) = hs.state() else { panic!() };
//! let mut decoder = RequestDecoder::new(n.export_config());
//! let d = decoder.decode(&wire[used..]).unwrap();
//! let Some(Event::Request(req)) = d.event else { panic!() };
//! assert_eq!(req.command, Command::Flush);
//! let reply = simple_reply(req.cookie, None); // after the flush completes
//! # let _ = reply;
//! ```

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod handshake;
pub mod proto;
pub mod server;
pub mod transmission;

pub use handshake::{
    BlockSizes, ExportCatalog, ExportInfo, Handshake, HandshakeConfig, HandshakeError, HandshakeState, Negotiated,
};
pub use proto::{
    ChunkType, ClientFlags, Command, CommandFlags, Cookie, HandshakeFlags, InfoType, NbdError, OptionCode, OptionReply,
    ReplyFlags, TransmissionFlags,
};
pub use server::{ExportStatus, ListenAddr, NbdServer};
pub use transmission::{
    chunk_header, error_chunk, error_offset_chunk, none_chunk, offset_data_header, offset_hole_chunk, simple_reply,
    validate, Decoded, EncodeError, Event, ExportConfig, ProtocolViolation, RawRequest, Rejection, Request,
    RequestDecoder, RequestError,
};
