//! tiercache-bdevs.
