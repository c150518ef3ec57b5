//! tiercache-jsonrpc.
