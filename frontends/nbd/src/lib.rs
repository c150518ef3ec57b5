//! tiercache-nbd.
