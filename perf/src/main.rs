//! `tiercache-perf`: see `tiercache-perf --help` and the crate docs.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn main() {
    let stop = Arc::new(AtomicBool::new(false));
    // Ctrl-C / SIGTERM end the run early; results so far are still reported.
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("tiercache-perf: cannot install a handler for signal {sig}: {e}");
        }
    }
    let code = tiercache_perf::run_cli(std::env::args_os(), &mut std::io::stdout(), &mut std::io::stderr(), stop);
    std::process::exit(code);
}
