//! Wire constants of the NBD protocol, as typed Rust values.
//!
//! Everything here is taken from the "Values" section of the NBD protocol
//! specification (`doc/proto.md` of the NetworkBlockDevice project), plus the
//! magic numbers from "Handshake", "Request message", "Simple reply message"
//! and "Structured reply chunk message". All integers travel in network byte
//! order (big endian).

use std::fmt;

/// `NBDMAGIC`, first 8 bytes of the server greeting (`INIT_PASSWD`).
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second 8 bytes of the greeting and prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that starts every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`, first 4 bytes of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Size of a (compact, non-extended) request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Zero padding after an `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES`.
pub const EXPORT_NAME_ZERO_PAD: usize = 124;
/// Longest string (export name, message) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Default maximum payload (2^25), the value every server SHOULD accept.
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;

macro_rules! flags_newtype {
    ($(#[$m:meta])* $name:ident($ty:ty) { $($(#[$fm:meta])* $flag:ident = $bit:expr;)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub $ty);

        impl $name {
            $($(#[$fm])* pub const $flag: $name = $name(1 << $bit);)*
            /// Every flag defined by the specification.
            pub const ALL: $name = $name(0 $(| (1 << $bit))*);
            /// No flags.
            pub const EMPTY: $name = $name(0);

            /// Raw wire value.
            pub const fn bits(self) -> $ty { self.0 }
            /// True when every bit of `other` is set in `self`.
            pub const fn contains(self, other: $name) -> bool { self.0 & other.0 == other.0 }
            /// `self` with the bits of `other` set.
            pub const fn with(self, other: $name) -> $name { $name(self.0 | other.0) }
            /// `self` with the bits of `other` cleared.
            pub const fn without(self, other: $name) -> $name { $name(self.0 & !other.0) }
            /// Bits not defined by the specification.
            pub const fn unknown_bits(self) -> $ty { self.0 & !Self::ALL.0 }
        }

        impl std::ops::BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name { $name(self.0 | rhs.0) }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#x}", stringify!($name), self.0)?;
                $(if self.contains($name::$flag) { write!(f, " {}", stringify!($flag))?; })*
                write!(f, ")")
            }
        }
    };
}

flags_newtype! {
    /// Handshake flags, sent by the server in the greeting (16 bits).
    HandshakeFlags(u16) {
        /// `NBD_FLAG_FIXED_NEWSTYLE`.
        FIXED_NEWSTYLE = 0;
        /// `NBD_FLAG_NO_ZEROES`.
        NO_ZEROES = 1;
    }
}

flags_newtype! {
    /// Client flags, the client's 32-bit answer to the greeting.
    ClientFlags(u32) {
        /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
        FIXED_NEWSTYLE = 0;
        /// `NBD_FLAG_C_NO_ZEROES`.
        NO_ZEROES = 1;
    }
}

flags_newtype! {
    /// Transmission flags (16 bits), describing an export.
    TransmissionFlags(u16) {
        /// `NBD_FLAG_HAS_FLAGS`, always set.
        HAS_FLAGS = 0;
        /// `NBD_FLAG_READ_ONLY`.
        READ_ONLY = 1;
        /// `NBD_FLAG_SEND_FLUSH`.
        SEND_FLUSH = 2;
        /// `NBD_FLAG_SEND_FUA`.
        SEND_FUA = 3;
        /// `NBD_FLAG_ROTATIONAL`.
        ROTATIONAL = 4;
        /// `NBD_FLAG_SEND_TRIM`.
        SEND_TRIM = 5;
        /// `NBD_FLAG_SEND_WRITE_ZEROES`.
        SEND_WRITE_ZEROES = 6;
        /// `NBD_FLAG_SEND_DF`.
        SEND_DF = 7;
        /// `NBD_FLAG_CAN_MULTI_CONN`.
        CAN_MULTI_CONN = 8;
        /// `NBD_FLAG_SEND_RESIZE` (experimental RESIZE extension).
        SEND_RESIZE = 9;
        /// `NBD_FLAG_SEND_CACHE`.
        SEND_CACHE = 10;
        /// `NBD_FLAG_SEND_FAST_ZERO`.
        SEND_FAST_ZERO = 11;
        /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD` (experimental extended headers).
        BLOCK_STATUS_PAYLOAD = 12;
    }
}

flags_newtype! {
    /// Command flags (16 bits) of a transmission request.
    CommandFlags(u16) {
        /// `NBD_CMD_FLAG_FUA`.
        FUA = 0;
        /// `NBD_CMD_FLAG_NO_HOLE`.
        NO_HOLE = 1;
        /// `NBD_CMD_FLAG_DF`.
        DF = 2;
        /// `NBD_CMD_FLAG_REQ_ONE`.
        REQ_ONE = 3;
        /// `NBD_CMD_FLAG_FAST_ZERO`.
        FAST_ZERO = 4;
        /// `NBD_CMD_FLAG_PAYLOAD_LEN` (experimental extended headers).
        PAYLOAD_LEN = 5;
    }
}

flags_newtype! {
    /// Structured reply chunk flags (16 bits).
    ReplyFlags(u16) {
        /// `NBD_REPLY_FLAG_DONE`: final chunk of a reply.
        DONE = 0;
    }
}

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident($ty:ty) { $($(#[$vm:meta])* $var:ident = $val:expr,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $var,)* }

        impl $name {
            /// Every value, in specification order.
            pub const ALL: &'static [$name] = &[$($name::$var,)*];
            /// Decode a wire value; `None` when the specification does not define it.
            pub const fn from_raw(raw: $ty) -> Option<$name> {
                match raw { $(x if x == $val => Some($name::$var),)* _ => None }
            }
            /// Wire value.
            pub const fn raw(self) -> $ty {
                match self { $($name::$var => $val,)* }
            }
        }
    };
}

const ERR: u32 = 1 << 31;

wire_enum! {
    /// Option codes (`NBD_OPT_*`) used during option haggling.
    OptionCode(u32) {
        /// `NBD_OPT_EXPORT_NAME`.
        ExportName = 1,
        /// `NBD_OPT_ABORT`.
        Abort = 2,
        /// `NBD_OPT_LIST`.
        List = 3,
        /// `NBD_OPT_PEEK_EXPORT` (withdrawn).
        PeekExport = 4,
        /// `NBD_OPT_STARTTLS`.
        StartTls = 5,
        /// `NBD_OPT_INFO`.
        Info = 6,
        /// `NBD_OPT_GO`.
        Go = 7,
        /// `NBD_OPT_STRUCTURED_REPLY`.
        StructuredReply = 8,
        /// `NBD_OPT_LIST_META_CONTEXT`.
        ListMetaContext = 9,
        /// `NBD_OPT_SET_META_CONTEXT`.
        SetMetaContext = 10,
        /// `NBD_OPT_EXTENDED_HEADERS` (experimental).
        ExtendedHeaders = 11,
    }
}

wire_enum! {
    /// Option reply types (`NBD_REP_*`); errors have bit 31 set.
    OptionReply(u32) {
        /// `NBD_REP_ACK`.
        Ack = 1,
        /// `NBD_REP_SERVER`.
        Server = 2,
        /// `NBD_REP_INFO`.
        Info = 3,
        /// `NBD_REP_META_CONTEXT`.
        MetaContext = 4,
        /// `NBD_REP_ERR_UNSUP`.
        ErrUnsup = ERR + 1,
        /// `NBD_REP_ERR_POLICY`.
        ErrPolicy = ERR + 2,
        /// `NBD_REP_ERR_INVALID`.
        ErrInvalid = ERR + 3,
        /// `NBD_REP_ERR_PLATFORM`.
        ErrPlatform = ERR + 4,
        /// `NBD_REP_ERR_TLS_REQD`.
        ErrTlsReqd = ERR + 5,
        /// `NBD_REP_ERR_UNKNOWN`.
        ErrUnknown = ERR + 6,
        /// `NBD_REP_ERR_SHUTDOWN`.
        ErrShutdown = ERR + 7,
        /// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
        ErrBlockSizeReqd = ERR + 8,
        /// `NBD_REP_ERR_TOO_BIG`.
        ErrTooBig = ERR + 9,
        /// `NBD_REP_ERR_EXT_HEADER_REQD` (experimental).
        ErrExtHeaderReqd = ERR + 10,
    }
}

impl OptionReply {
    /// True for the error replies (bit 31 set).
    pub const fn is_error(self) -> bool {
        self.raw() & ERR != 0
    }
}

wire_enum! {
    /// Information types (`NBD_INFO_*`) for `NBD_OPT_INFO` / `NBD_OPT_GO`.
    InfoType(u16) {
        /// `NBD_INFO_EXPORT`: size and transmission flags.
        Export = 0,
        /// `NBD_INFO_NAME`: canonical export name.
        Name = 1,
        /// `NBD_INFO_DESCRIPTION`: human readable description.
        Description = 2,
        /// `NBD_INFO_BLOCK_SIZE`: minimum / preferred / maximum payload.
        BlockSize = 3,
    }
}

wire_enum! {
    /// Request types (`NBD_CMD_*`).
    Command(u16) {
        /// `NBD_CMD_READ`.
        Read = 0,
        /// `NBD_CMD_WRITE`.
        Write = 1,
        /// `NBD_CMD_DISC`.
        Disc = 2,
        /// `NBD_CMD_FLUSH`.
        Flush = 3,
        /// `NBD_CMD_TRIM`.
        Trim = 4,
        /// `NBD_CMD_CACHE`.
        Cache = 5,
        /// `NBD_CMD_WRITE_ZEROES`.
        WriteZeroes = 6,
        /// `NBD_CMD_BLOCK_STATUS`.
        BlockStatus = 7,
        /// `NBD_CMD_RESIZE` (experimental).
        Resize = 8,
    }
}

wire_enum! {
    /// Structured reply chunk types (`NBD_REPLY_TYPE_*`); errors have bit 15 set.
    ChunkType(u16) {
        /// `NBD_REPLY_TYPE_NONE`.
        None = 0,
        /// `NBD_REPLY_TYPE_OFFSET_DATA`.
        OffsetData = 1,
        /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
        OffsetHole = 2,
        /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
        BlockStatus = 5,
        /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (experimental).
        BlockStatusExt = 6,
        /// `NBD_REPLY_TYPE_ERROR`.
        Error = (1 << 15) + 1,
        /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
        ErrorOffset = (1 << 15) + 2,
    }
}

wire_enum! {
    /// Error values carried in replies ("Error values" section).
    NbdError(u32) {
        /// `NBD_EPERM`.
        Perm = 1,
        /// `NBD_EIO`.
        Io = 5,
        /// `NBD_ENOMEM`.
        NoMem = 12,
        /// `NBD_EINVAL`.
        Inval = 22,
        /// `NBD_ENOSPC`.
        NoSpc = 28,
        /// `NBD_EOVERFLOW`.
        Overflow = 75,
        /// `NBD_ENOTSUP`.
        NotSup = 95,
        /// `NBD_ESHUTDOWN`.
        Shutdown = 108,
    }
}

impl NbdError {
    /// Map a host `errno` to the NBD error the spec allows on the wire.
    ///
    /// Negative values (as io_uring completions carry them) are accepted.
    /// Per the spec, `EDQUOT`/`EFBIG` become `ENOSPC`; `EROFS`/`EACCES`
    /// become `EPERM`; `EOPNOTSUPP` becomes `ENOTSUP`. Anything else
    /// (including the non-error `0`, which callers should not pass) maps to
    /// `EIO`: for a block device an unexplained failure is an I/O failure.
    pub fn from_errno(errno: i32) -> NbdError {
        match errno.checked_abs().unwrap_or(0) {
            libc::EPERM | libc::EROFS | libc::EACCES => NbdError::Perm,
            libc::EIO => NbdError::Io,
            libc::ENOMEM => NbdError::NoMem,
            libc::EINVAL => NbdError::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdError::NoSpc,
            libc::EOVERFLOW => NbdError::Overflow,
            e if e == libc::ENOTSUP || e == libc::EOPNOTSUPP => NbdError::NotSup,
            libc::ESHUTDOWN => NbdError::Shutdown,
            _ => NbdError::Io,
        }
    }
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            NbdError::Perm => "EPERM",
            NbdError::Io => "EIO",
            NbdError::NoMem => "ENOMEM",
            NbdError::Inval => "EINVAL",
            NbdError::NoSpc => "ENOSPC",
            NbdError::Overflow => "EOVERFLOW",
            NbdError::NotSup => "ENOTSUP",
            NbdError::Shutdown => "ESHUTDOWN",
        };
        f.write_str(s)
    }
}

/// The client's opaque 64-bit request identifier ("handle" in older spec
/// versions, "cookie" in newer ones). Echoed byte-for-byte in replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Cookie(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_ascii_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(OPTION_REPLY_MAGIC.to_be_bytes(), [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
    }

    #[test]
    fn spec_values() {
        assert_eq!(OptionCode::Go.raw(), 7);
        assert_eq!(OptionCode::from_raw(8), Some(OptionCode::StructuredReply));
        assert_eq!(OptionCode::from_raw(0), None);
        assert_eq!(OptionReply::ErrUnsup.raw(), 0x8000_0001);
        assert_eq!(OptionReply::ErrTooBig.raw(), 0x8000_0009);
        assert!(OptionReply::ErrUnknown.is_error() && !OptionReply::Info.is_error());
        assert_eq!(Command::WriteZeroes.raw(), 6);
        assert_eq!(Command::from_raw(9), None);
        assert_eq!(ChunkType::ErrorOffset.raw(), 0x8002);
        assert_eq!(InfoType::BlockSize.raw(), 3);
        assert_eq!(TransmissionFlags::SEND_CACHE.bits(), 0x400);
        assert_eq!(TransmissionFlags::CAN_MULTI_CONN.bits(), 0x100);
        assert_eq!(CommandFlags::ALL.bits(), 0x3f);
        assert_eq!(CommandFlags(0x41).unknown_bits(), 0x40);
        assert_eq!(HandshakeFlags::ALL.bits(), 3);
        for e in NbdError::ALL {
            assert_eq!(NbdError::from_raw(e.raw()), Some(*e));
        }
    }

    #[test]
    fn errno_mapping() {
        let cases = [
            (libc::EPERM, NbdError::Perm, 1),
            (libc::EIO, NbdError::Io, 5),
            (libc::ENOMEM, NbdError::NoMem, 12),
            (libc::EINVAL, NbdError::Inval, 22),
            (libc::ENOSPC, NbdError::NoSpc, 28),
            (libc::EOVERFLOW, NbdError::Overflow, 75),
            (libc::ENOTSUP, NbdError::NotSup, 95),
            (libc::ESHUTDOWN, NbdError::Shutdown, 108),
            (libc::EDQUOT, NbdError::NoSpc, 28),
            (libc::EFBIG, NbdError::NoSpc, 28),
            (libc::EROFS, NbdError::Perm, 1),
            (libc::EOPNOTSUPP, NbdError::NotSup, 95),
            (libc::ENOENT, NbdError::Io, 5),
        ];
        for (errno, want, wire) in cases {
            assert_eq!(NbdError::from_errno(errno), want, "errno {errno}");
            assert_eq!(NbdError::from_errno(-errno), want, "-errno {errno}");
            assert_eq!(want.raw(), wire);
        }
        assert_eq!(NbdError::from_errno(i32::MIN), NbdError::Io);
    }

    #[test]
    fn flags_debug_names_bits() {
        let f = TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY;
        assert_eq!(format!("{f:?}"), "TransmissionFlags(0x3 HAS_FLAGS READ_ONLY)");
        assert!(f.contains(TransmissionFlags::READ_ONLY));
        assert!(!f.without(TransmissionFlags::READ_ONLY).contains(TransmissionFlags::READ_ONLY));
    }
}
