//! Errors on the I/O path keep their errno.
//!
//! Every I/O completion carries `Result<(), Errno>`. The errno is the contract with the
//! frontends: NBD maps it to an NBD error value, JSON-RPC returns `-errno` like SPDK. A
//! string is never the error; a message may accompany an errno in logs and RPC replies.

use std::fmt;

/// A Linux errno value (positive).
#[derive(Copy, Clone, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EINTR: Errno = Errno(libc::EINTR);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENXIO: Errno = Errno(libc::ENXIO);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENODEV: Errno = Errno(libc::ENODEV);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const ENOTSUP: Errno = Errno(libc::EOPNOTSUPP);
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);
    pub const ESHUTDOWN: Errno = Errno(libc::ESHUTDOWN);
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);
    pub const ECANCELED: Errno = Errno(libc::ECANCELED);
    pub const EILSEQ: Errno = Errno(libc::EILSEQ);
    pub const ESTALE: Errno = Errno(libc::ESTALE);

    /// The errno of an `std::io::Error`, EIO when it has none.
    pub fn from_io(err: &std::io::Error) -> Errno {
        Errno(err.raw_os_error().unwrap_or(libc::EIO))
    }

    /// The errno of a negative io_uring / syscall result (`res < 0`).
    pub fn from_neg(res: i32) -> Errno {
        debug_assert!(res < 0, "from_neg called with a non-negative result {res}");
        Errno(res.checked_neg().unwrap_or(libc::EIO))
    }

    /// Conditions that pass with time: the I/O is queued and retried, never failed for them.
    pub fn is_transient(self) -> bool {
        matches!(self.0, libc::EAGAIN | libc::ENOMEM | libc::EINTR | libc::EBUSY)
    }

    /// A short symbolic name ("EIO").
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::ENXIO => "ENXIO",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENODEV => "ENODEV",
            libc::EINVAL => "EINVAL",
            libc::ENOSPC => "ENOSPC",
            libc::EROFS => "EROFS",
            libc::ERANGE => "ERANGE",
            libc::EOPNOTSUPP => "ENOTSUP",
            libc::EOVERFLOW => "EOVERFLOW",
            libc::ESHUTDOWN => "ESHUTDOWN",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::ECANCELED => "ECANCELED",
            libc::EILSEQ => "EILSEQ",
            libc::ESTALE => "ESTALE",
            _ => "E?",
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = std::io::Error::from_raw_os_error(self.0);
        write!(f, "{} ({})", self.name(), msg)
    }
}

impl std::error::Error for Errno {}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_results_map_back_to_errno() {
        assert_eq!(Errno::from_neg(-libc::EIO), Errno::EIO);
        assert_eq!(Errno::from_neg(i32::MIN), Errno::EIO);
        assert!(Errno::ENOMEM.is_transient());
        assert!(!Errno::EIO.is_transient());
        assert_eq!(format!("{:?}", Errno::ENOSPC), "ENOSPC(28)");
    }
}
