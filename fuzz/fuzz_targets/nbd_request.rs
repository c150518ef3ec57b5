//! Fuzz the NBD transmission request decoder and validator: the first bytes
//! pick an export configuration, the rest is the client's byte stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiercache_nbd::*;

fuzz_target!(|data: &[u8]| {
    let Some((ctl, input)) = data.split_first_chunk::<4>() else {
        return;
    };
    let flags = TransmissionFlags(u16::from_be_bytes([ctl[0], ctl[1]])).with(TransmissionFlags::HAS_FLAGS);
    let minimum = 1u32 << (ctl[2] % 13);
    let block_sizes = BlockSizes::new(minimum, minimum.max(4096), 1 << 20).unwrap_or_default();
    let size = u64::from(ctl[3]) << (ctl[3] % 48);
    let cfg = ExportConfig::new(size, flags, block_sizes, ctl[2] & 0x80 != 0).with_discard_limit(1 << 16);

    // Header-level API on every 28-byte window.
    for window in input.windows(28).step_by(7) {
        if let Ok(raw) = window.try_into().map_err(|_| ()).and_then(|h| RawRequest::parse(h).map_err(|_| ())) {
            match validate(&raw, &cfg) {
                Ok(req) => {
                    let _ = offset_data_header(req.cookie, req.offset, req.length, true);
                }
                Err(rej) => {
                    let mut out = Vec::new();
                    rej.encode(cfg.structured_replies(), &mut out);
                }
            }
        }
    }

    // Streaming decoder, fed in two pieces.
    let mut dec = RequestDecoder::new(cfg);
    let cut = usize::from(ctl[1]).min(input.len());
    for piece in [&input[..cut], &input[cut..]] {
        let mut rest = piece;
        loop {
            match dec.decode(rest) {
                Err(_) => return,
                Ok(d) => {
                    assert!(d.consumed <= rest.len());
                    rest = &rest[d.consumed..];
                    if d.event.is_none() {
                        break;
                    }
                }
            }
        }
    }
});
