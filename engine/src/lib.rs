//! tiercache engine.
